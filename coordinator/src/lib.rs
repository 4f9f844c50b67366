//! The coordinator: it plans where the model's layers and experts live ([`placement`]), brings
//! the workers up ([`cluster`]), runs one scheduler and pipeline driver per lane ([`lane`]) and
//! serves clients: the gRPC server ([`server`], [`api`]) and the HTTP port ([`http`],
//! [`openai`], the dashboard fed by [`monitor`]), both behind TLS and API keys when asked
//! ([`auth`]). Every request enters through [`admission`]. It
//! holds no weights and no KV memory: workers do; it owns the decisions (what runs when, which
//! KV blocks a sequence holds) and the client streams.
//!
//! Which workers it has, and when the placement changes, is [`membership`]'s: a static list,
//! or workers registered in etcd, with coordinators electing a leader there. The part this
//! process plays (leading, standing by, draining) is [`role`]'s; a standby forwards its
//! clients' calls to the leader ([`forward`]). The process's life (start, serve, drain on
//! SIGTERM, stop) is [`run`]'s.

pub mod admission;
pub mod api;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod forward;
pub mod http;
pub mod lane;
pub mod membership;
pub mod metrics;
pub mod monitor;
pub mod openai;
pub mod placement;
pub mod role;
pub mod run;
pub mod server;

pub use cluster::{Cluster, ClusterConfig, Routing, StartError};
pub use placement::{Grid, PlanOptions};
