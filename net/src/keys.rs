//! Where a cluster lives in etcd: every key of cluster `NAME` is under `/switchyard/NAME/`
//! (workers' records, the published placement, the coordinators' election).

/// A cluster name that cannot be part of a key.
#[derive(Debug, thiserror::Error)]
#[error("cluster name {0:?}: expected letters, digits, '-', '_' or '.'")]
pub struct BadClusterName(pub String);

/// Where a cluster's keys live in etcd.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// The keys of cluster `name` (letters, digits, `-`, `_`, `.`).
    pub fn new(name: &str) -> Result<Keys, BadClusterName> {
        let ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if name.is_empty() || !name.chars().all(ok) {
            return Err(BadClusterName(name.to_string()));
        }
        Ok(Keys {
            root: format!("/switchyard/{name}/"),
        })
    }

    pub fn workers(&self) -> String {
        format!("{}workers/", self.root)
    }

    pub fn worker(&self, address: &str) -> String {
        format!("{}{address}", self.workers())
    }

    pub fn placement(&self) -> String {
        format!("{}placement", self.root)
    }

    /// The election coordinators campaign in.
    pub fn leader(&self) -> String {
        format!("{}leader", self.root)
    }
}
