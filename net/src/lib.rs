//! What crosses a process boundary, for the coordinator and the workers alike: gRPC channels
//! and the cluster's message limit ([`grpc`]), conversions between the wire messages and the
//! scheduler's types ([`wire`]), W3C trace context in gRPC metadata ([`trace_context`]), and
//! etcd: a small client over its v3 API ([`etcd`]: KV, leases, watches, election) and where a
//! cluster's keys live ([`keys`]); and a serving process's edges: binding its ports and waiting
//! for the signal to drain ([`process`]); TLS on every plane and the cluster's identity
//! ([`tls`]); how clients reach the client-facing ports: TLS, client certificates, API keys
//! ([`api_client`]).

pub mod api_client;
pub mod etcd;
pub mod grpc;
pub mod keys;
pub mod process;
pub mod tls;
pub mod trace_context;
pub mod wire;
