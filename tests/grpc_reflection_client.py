"""grpcio's own reflection client (`grpc_reflection.v1alpha`) against a running coordinator
(run by tests/reflection.rs).

usage: grpc_reflection_client.py ADDRESS

Discovers the services, resolves `switchyard.v1.Inference` and its messages from the server's
descriptors alone (no .proto file), then calls `ListModels` with messages built from them.
Prints the model's id as its last line.
"""

import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


address = sys.argv[1]
channel = grpc.insecure_channel(address)
db = ProtoReflectionDescriptorDatabase(channel)
services = db.get_services()
check("switchyard.v1.Inference" in services, f"Inference listed: {services}")
check("grpc.health.v1.Health" in services, f"Health listed: {services}")

pool = descriptor_pool.DescriptorPool(db)
inference = pool.FindServiceByName("switchyard.v1.Inference")
methods = {m.name: m for m in inference.methods}
check({"Generate", "Tokenize", "ListModels", "ClusterStatus"} <= set(methods), f"methods {list(methods)}")
generate = methods["Generate"]
check(generate.output_type.full_name == "switchyard.v1.GenerateResponse", "Generate's response type")
fields = {f.name for f in generate.input_type.fields}
check({"prompt", "prompt_token_ids", "max_tokens", "temperature"} <= fields, f"GenerateRequest fields {fields}")

# A call made with nothing but what reflection told.
list_models = methods["ListModels"]
request_cls = message_factory.GetMessageClass(list_models.input_type)
response_cls = message_factory.GetMessageClass(list_models.output_type)
call = channel.unary_unary(
    "/switchyard.v1.Inference/ListModels",
    request_serializer=request_cls.SerializeToString,
    response_deserializer=response_cls.FromString,
)
reply = call(request_cls(), timeout=30)
check(len(reply.models) == 1, f"one model: {reply}")

# An unknown symbol is NOT_FOUND from the server, not a hang.
try:
    pool.FindServiceByName("switchyard.v1.NoSuchService")
    raise AssertionError("an unknown service was found")
except grpc.RpcError as e:
    check(e.code() == grpc.StatusCode.NOT_FOUND, f"NOT_FOUND, got {e.code()}")
print(reply.models[0].id)
