"""The GGUF reference for model/tests/gguf_py.rs: gguf-py (the llama.cpp project's package).

`write OUT.gguf OUT.json`: writes a GGUF with GGUFWriter (every value type, nested arrays, f32,
f16 and Q8_0 tensors quantized by gguf.quants) and, as JSON, what it wrote.
`read IN.gguf`: prints, as JSON, what GGUFReader reads from a file (ours).
"""
import json
import sys

import numpy as np
import gguf


def write(path, out):
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -7)
    w.add_uint64("t.u64", 1 << 40)
    w.add_int64("t.i64", -(1 << 40))
    w.add_float32("t.f32", 1e-5)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁world")
    w.add_array("t.strs", ["a", "Ġb", "<|im_end|>"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.nested", [[1, 2], [3]])
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 5), dtype=np.float32)
    b = rng.standard_normal((4, 8)).astype(np.float16)
    c = rng.standard_normal((2, 3, 64), dtype=np.float32)
    cq = gguf.quants.quantize(c, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("a.weight", a)
    w.add_tensor("b.weight", b)
    w.add_tensor("c.weight", cq, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensors = {
        "a.weight": {"shape": list(a.shape), "type": "F32", "bytes": a.tobytes().hex()},
        "b.weight": {"shape": list(b.shape), "type": "F16", "bytes": b.tobytes().hex()},
        "c.weight": {
            "shape": list(c.shape),
            "type": "Q8_0",
            "bytes": cq.tobytes().hex(),
            "f32": gguf.quants.dequantize(cq, gguf.GGMLQuantizationType.Q8_0).flatten().tolist(),
        },
    }
    with open(out, "w") as f:
        json.dump({"tensors": tensors}, f)


def read(path):
    r = gguf.GGUFReader(path)
    meta = {}
    for k, field in r.fields.items():
        if k.startswith("GGUF."):
            continue
        meta[k] = {"types": [t.name for t in field.types], "value": field.contents()}
    tensors = {}
    for t in r.tensors:
        tensors[t.name] = {
            "shape": [int(d) for d in reversed(t.shape.tolist())],
            "type": t.tensor_type.name,
            "bytes": np.asarray(t.data).tobytes().hex(),
        }
    print(json.dumps({"metadata": meta, "tensors": tensors}))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3])
    else:
        read(sys.argv[2])
