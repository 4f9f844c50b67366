//! The coordinator: it plans where the model's layers and experts live ([`placement`]), brings
//! the workers up ([`cluster`]), runs one scheduler and pipeline driver per lane ([`lane`]) and
//! serves clients ([`api`]). It holds no weights and no KV memory: workers do; it owns the
//! decisions (what runs when, which KV blocks a sequence holds) and the client streams.
//! Which workers it has, and when the placement changes, is [`membership`]'s: a static list,
//! or workers registered in etcd, with coordinators electing a leader there; a standby forwards
//! its clients' calls to the leader ([`forward`]).

pub mod api;
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
pub mod run;

pub use cluster::{Cluster, ClusterConfig, StartError};
pub use placement::{Grid, PlanOptions};
