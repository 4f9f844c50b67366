//! `switchyard plan`: before buying anything, which grid of which devices serves a model, with
//! how much memory per worker, at what speed and cost per token.
//!
//! Memory per worker is the coordinator's own placement ([`memory`], over
//! `switchyard_coordinator::placement::plan`), so the plan and the cluster that runs it count
//! the same bytes. Devices come from a catalog with sources ([`hardware`], `hardware.json`);
//! models from presets of published shapes, local files or the Hugging Face cache ([`models`]);
//! speed from a roofline model of each operation ([`time`]); the candidates and their ranking
//! from [`candidates`].

pub mod candidates;
pub mod hardware;
pub mod memory;
pub mod models;
pub mod time;
pub mod units;

pub use candidates::{candidates, rank, table, Candidate, Workload};
pub use hardware::{Catalog, Device, Hardware, HardwareError, Kind};
pub use models::{Model, ModelError};
