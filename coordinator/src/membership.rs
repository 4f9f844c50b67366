//! Membership: which workers the cluster has, and when its placement must change.
//!
//! The leader's loop ([`Leader`]) watches the workers (a static list, or the records workers
//! keep in etcd under their leases) and the lanes' step failures, and re-plans:
//!
//! - a step failed, or a worker of the placement left the registry (its lease expired): the
//!   placement's workers are probed; those that do not answer, or lost their part, are
//!   suspects until they answer again; the cluster re-plans on the others;
//! - a worker of the placement drains: its lane takes no new requests; once that lane is
//!   idle (or the grace period ends) the cluster re-plans without it and releases it;
//! - more healthy workers than the placement uses (a replacement, a new worker): re-plan on
//!   a grid with more cells;
//! - nothing served: re-plan as soon as workers are there.
//!
//! With etcd several coordinators campaign for leadership ([`run_etcd`]), each proclaiming its
//! client API address; the winner reads the last published placement (its epoch, its workers,
//! so an unchanged worker keeps its weights), re-plans with a higher epoch (which fences off a
//! previous leader's steps: workers watch the published placement and refuse older epochs)
//! and publishes each new placement. The others stand by and follow who leads, forwarding
//! their clients' calls there ([`crate::forward`]). If etcd goes down the leader serves on:
//! nothing it does between changes needs etcd.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use switchyard_net::etcd::{Etcd, EtcdError};
use switchyard_net::keys::Keys;
use switchyard_proto::v1 as pb;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cluster::{probe_all, release, Cluster};
use crate::placement::grids_for;

/// How long a probed worker may take to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a suspect is probed again.
const REPROBE: Duration = Duration::from_secs(2);
/// The least time between two attempts at a placement that failed.
const RETRY: Duration = Duration::from_millis(500);

/// The workers known now: address → draining. `None` until first heard of (etcd).
type Members = Option<BTreeMap<String, bool>>;

/// The leading coordinator's view and decisions.
struct Leader {
    cluster: Arc<Cluster>,
    members: watch::Receiver<Members>,
    /// Workers that did not answer a probe, and when they were last probed.
    suspects: HashMap<String, Instant>,
    /// The placement epoch last used (served or tried).
    epoch: u64,
    /// Workers in their order in the last placement: kept in place when re-planning.
    preferred: Vec<String>,
    /// Why the placement is in trouble (a lane's step failed).
    failed: Option<String>,
    /// Draining workers of the placement and when their grace period ends.
    drains: HashMap<String, Instant>,
    not_before: Instant,
    publish: Option<Publish>,
}

/// Where the leader publishes placements.
struct Publish {
    etcd: Etcd,
    keys: Keys,
    address: String,
}

impl Leader {
    fn new(
        cluster: Arc<Cluster>,
        members: watch::Receiver<Members>,
        epoch: u64,
        preferred: Vec<String>,
        publish: Option<Publish>,
    ) -> Leader {
        Leader {
            cluster,
            members,
            suspects: HashMap::new(),
            epoch,
            preferred,
            failed: None,
            drains: HashMap::new(),
            not_before: Instant::now(),
            publish,
        }
    }

    /// Leads until `until` resolves.
    async fn run(mut self, until: impl Future<Output = ()>) {
        let failures = self.cluster.failures();
        let mut failures = failures.lock().await;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(until);
        loop {
            tokio::select! {
                _ = &mut until => return,
                Some(f) = failures.recv() => {
                    if f.epoch == self.epoch && self.failed.is_none() {
                        self.failed = Some(format!("lane {} failed a step ({})", f.lane, f.reason));
                    }
                }
                _ = self.members.changed() => {}
                _ = tick.tick() => {}
            }
            self.cluster.tend_parked();
            self.tend().await;
        }
    }

    fn members(&self) -> Members {
        self.members.borrow().clone()
    }

    /// Registered, not draining, not suspect: preferred ones first, in their places.
    fn healthy(&self) -> Vec<String> {
        let Some(members) = self.members() else {
            return Vec::new();
        };
        let ok = |a: &String| members.get(a) == Some(&false) && !self.suspects.contains_key(a);
        let mut out: Vec<String> = self.preferred.iter().filter(|a| ok(a)).cloned().collect();
        out.extend(
            members
                .keys()
                .filter(|a| ok(a) && !self.preferred.contains(a))
                .cloned(),
        );
        out
    }

    async fn tend(&mut self) {
        self.reprobe_suspects().await;
        let Some(serving) = self.cluster.serving() else {
            if Instant::now() >= self.not_before {
                self.replan("no placement yet".into(), None).await;
            }
            return;
        };
        let placement = &serving.placement;
        let cells: Vec<String> = placement.cells.iter().map(|c| c.address.clone()).collect();
        let members = self.members();

        // A step failed, or a worker of the placement left the registry: who is gone?
        let missing: Vec<&String> = match &members {
            Some(m) => cells.iter().filter(|a| !m.contains_key(*a)).collect(),
            None => Vec::new(),
        };
        if self.failed.is_some() || !missing.is_empty() {
            let probes = probe_all(&cells, PROBE_TIMEOUT).await;
            let mut lost = Vec::new();
            for (address, probe) in cells.iter().zip(probes) {
                let trouble = match probe {
                    Err(e) => Some(e.to_string()),
                    Ok((_, r)) if r.epoch != placement.epoch => Some(format!(
                        "worker {address} holds epoch {} instead of {}",
                        r.epoch, placement.epoch
                    )),
                    Ok(_) => None,
                };
                if let Some(t) = trouble {
                    self.suspects.insert(address.clone(), Instant::now());
                    lost.push(t);
                }
            }
            let failed = self.failed.take();
            if lost.is_empty() && failed.is_none() {
                // Its record went (an etcd hiccup) but it serves: it registers again.
                return;
            }
            let reason = match lost.is_empty() {
                true => failed.unwrap_or_default(),
                false => lost.join("; "),
            };
            warn!(epoch = placement.epoch, "placement in trouble: {reason}");
            self.replan(reason, None).await;
            return;
        }

        // Draining workers of the placement: their lanes take nothing new; once those are
        // idle, or a grace period ends, re-plan without them.
        let draining: Vec<(String, usize)> = placement
            .cells
            .iter()
            .filter(|c| {
                members
                    .as_ref()
                    .is_some_and(|m| m.get(&c.address) == Some(&true))
            })
            .map(|c| (c.address.clone(), c.shard))
            .collect();
        if !draining.is_empty() {
            let now = Instant::now();
            for (address, shard) in &draining {
                serving.lanes[*shard].set_draining(true);
                self.drains
                    .entry(address.clone())
                    .or_insert(now + self.cluster.config().drain_grace);
            }
            let idle = draining.iter().all(|(_, s)| serving.lanes[*s].is_idle());
            let overdue = self.drains.values().any(|d| *d <= now);
            if idle || overdue {
                let names: Vec<&str> = draining.iter().map(|(a, _)| a.as_str()).collect();
                self.replan(format!("draining {}", names.join(", ")), None)
                    .await;
            }
            return;
        }

        // Workers to spare: grow when a grid with more cells is possible.
        let healthy = self.healthy();
        let more = grids_for(self.cluster.config().grid, healthy.len())
            .first()
            .is_some_and(|g| g.cells() > placement.grid.cells());
        if more && Instant::now() >= self.not_before {
            let cells = placement.grid.cells();
            self.replan(format!("{} workers available", healthy.len()), Some(cells))
                .await;
        }
    }

    /// Probes suspects again now and then; those that answer are healthy again.
    async fn reprobe_suspects(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .suspects
            .iter()
            .filter(|(_, t)| now - **t >= REPROBE)
            .map(|(a, _)| a.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let probes = probe_all(&due, PROBE_TIMEOUT).await;
        for (address, probe) in due.into_iter().zip(probes) {
            match probe {
                Ok((_, r)) if !r.draining => {
                    info!(worker = %address, "answers again");
                    self.suspects.remove(&address);
                }
                _ => {
                    self.suspects.insert(address, Instant::now());
                }
            }
        }
    }

    /// A new placement over the healthy workers; with `bigger_than`, only if it has more cells.
    async fn replan(&mut self, reason: String, bigger_than: Option<usize>) {
        let healthy = self.healthy();
        let probes = probe_all(&healthy, PROBE_TIMEOUT).await;
        let mut inventories = Vec::new();
        let mut holding = Vec::new();
        // The highest epoch any worker saw: workers refuse anything older (a placement
        // record lost with etcd's data, or a leader that never read it).
        let mut seen = 0;
        for (address, probe) in healthy.iter().zip(probes) {
            if let Ok((_, r)) = &probe {
                seen = seen.max(r.fence).max(r.epoch);
            }
            match probe {
                Ok((_, r)) if r.draining => {}
                Ok((inventory, r)) => {
                    if r.epoch != 0 {
                        holding.push(address.clone());
                    }
                    inventories.push(inventory);
                }
                Err(e) => {
                    warn!("{e}");
                    self.suspects.insert(address.clone(), Instant::now());
                }
            }
        }
        let epoch = self.epoch.max(seen) + 1;
        self.not_before = Instant::now() + RETRY;
        if inventories.is_empty() {
            let why = format!("{reason}; no healthy worker is registered");
            self.cluster.set_why_not(why.clone());
            if bigger_than.is_none() && self.cluster.serving().is_some() {
                self.cluster.stop_serving(&why).await;
            }
            self.release_drained(epoch).await;
            return;
        }
        let planned = self.cluster.plan(&inventories, epoch);
        let placement = match planned {
            Ok(p) => p,
            Err(e) => {
                let why = format!("{reason}; no placement possible: {e}");
                warn!("{why}");
                self.cluster.set_why_not(why.clone());
                // A placement in trouble, or one whose drained workers wait, ends here.
                if bigger_than.is_none() && self.cluster.serving().is_some() {
                    self.cluster.stop_serving(&why).await;
                    self.release_drained(epoch).await;
                }
                return;
            }
        };
        if bigger_than.is_some_and(|n| placement.grid.cells() <= n) {
            // The extra workers do not make a bigger grid the model fits on.
            self.not_before = Instant::now() + REPROBE;
            return;
        }
        info!(epoch, "re-planning: {reason}");
        self.epoch = epoch;
        self.failed = None;
        match self.cluster.transition(inventories, epoch).await {
            Ok(serving) => {
                let used: Vec<String> = serving
                    .placement
                    .cells
                    .iter()
                    .map(|c| c.address.clone())
                    .collect();
                self.preferred = used.clone();
                self.publish(&serving.placement).await;
                self.release_drained(epoch).await;
                // Workers left out still hold a part of an older placement: free it.
                let spare: Vec<String> =
                    holding.into_iter().filter(|a| !used.contains(a)).collect();
                release(&spare, epoch, PROBE_TIMEOUT).await;
            }
            Err(e) => {
                let why = format!("{reason}; placement {epoch} failed: {e}");
                warn!("{why}");
                if let Some(w) = e.worker() {
                    self.suspects.insert(w.to_string(), Instant::now());
                }
                self.cluster.set_why_not(why);
            }
        }
    }

    async fn release_drained(&mut self, epoch: u64) {
        let drained: Vec<String> = self.drains.drain().map(|(a, _)| a).collect();
        release(&drained, epoch, PROBE_TIMEOUT).await;
    }

    async fn publish(&self, placement: &crate::placement::Placement) {
        let Some(p) = &self.publish else { return };
        let record = pb::PlacementRecord {
            epoch: placement.epoch,
            stages: placement.grid.stages as u32,
            shards: placement.grid.shards as u32,
            workers: placement.cells.iter().map(|c| c.address.clone()).collect(),
            model: self.cluster.model_name().to_string(),
            leader: p.address.clone(),
        };
        if let Err(e) = p
            .etcd
            .put(&p.keys.placement(), record.encode_to_vec(), 0)
            .await
        {
            warn!("cannot publish placement {} to etcd: {e}", placement.epoch);
        }
    }
}

/// Leads a static cluster (started by [`Cluster::start`] at epoch 1) until `until`.
pub async fn run_static(cluster: Arc<Cluster>, until: impl Future<Output = ()>) {
    let workers = cluster.config().workers.clone();
    let members: BTreeMap<String, bool> = workers.iter().map(|w| (w.clone(), false)).collect();
    let (_keep, rx) = watch::channel(Some(members));
    Leader::new(cluster, rx, 1, workers, None).run(until).await;
}

/// A coordinator's membership of an etcd cluster.
#[derive(Clone)]
pub struct EtcdMembership {
    pub etcd: Etcd,
    pub keys: Keys,
    /// This coordinator's client API address, proclaimed while it leads.
    pub address: String,
    /// The time to live of its leadership lease.
    pub ttl: Duration,
}

/// Campaigns for leadership, leads while elected, stands by otherwise, until `stop` turns
/// true; then resigns (so a standby takes over at once) and returns.
pub async fn run_etcd(cluster: Arc<Cluster>, m: EtcdMembership, mut stop: watch::Receiver<bool>) {
    let (tx, members) = watch::channel(None);
    let watcher = tokio::spawn(watch_workers(m.etcd.clone(), m.keys.clone(), tx));
    // Who leads, for a standby to forward its clients' calls to.
    cluster.role().set_me(&m.address);
    let elected = tokio::spawn(watch_leader(
        m.etcd.clone(),
        m.keys.clone(),
        cluster.clone(),
    ));
    let stopped = |s: &watch::Receiver<bool>| *s.borrow();
    while !stopped(&stop) {
        cluster.role().set_leading(false);
        let lease = match m.etcd.grant(m.ttl).await {
            Ok(l) => l,
            Err(e) => {
                warn!("cannot get an etcd lease to campaign with (will retry): {e}");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        let (lost_tx, mut lost) = watch::channel(false);
        let keeper = tokio::spawn(keep_lease(m.etcd.clone(), lease, m.ttl, lost_tx));
        let election = m.keys.leader();
        let campaign = m
            .etcd
            .campaign(&election, lease, m.address.clone().into_bytes());
        let key = tokio::select! {
            r = campaign => r,
            _ = stop.changed() => {
                keeper.abort();
                let _ = m.etcd.revoke(lease).await;
                break;
            }
            _ = lost.changed() => Err(EtcdError::LeaseExpired(lease)),
        };
        let key = match key {
            Ok(k) => k,
            Err(e) => {
                keeper.abort();
                warn!("campaign failed (will retry): {e}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        info!(address = %m.address, "leading the cluster");
        let (epoch, preferred) = match m.etcd.get(&m.keys.placement()).await {
            Ok(Some(bytes)) => match pb::PlacementRecord::decode(bytes.as_slice()) {
                Ok(r) => (r.epoch, r.workers),
                Err(e) => {
                    warn!("the published placement is unreadable ({e}); planning anew");
                    (0, Vec::new())
                }
            },
            _ => (0, Vec::new()),
        };
        cluster.role().set_leading(true);
        let publish = Publish {
            etcd: m.etcd.clone(),
            keys: m.keys.clone(),
            address: m.address.clone(),
        };
        let leader = Leader::new(
            cluster.clone(),
            members.clone(),
            epoch,
            preferred,
            Some(publish),
        );
        let mut stop2 = stop.clone();
        let mut lost2 = lost.clone();
        leader
            .run(async move {
                tokio::select! {
                    _ = stop2.wait_for(|s| *s) => {}
                    _ = lost2.wait_for(|l| *l) => {}
                }
            })
            .await;
        if *lost.borrow() {
            warn!("leadership lost (the lease expired); standing by");
            cluster
                .fail_all("this coordinator lost its leadership; retry on the new leader")
                .await;
            keeper.abort();
            continue;
        }
        // Stopping: hand over at once.
        if let Err(e) = m.etcd.resign(key).await {
            warn!("cannot resign (the lease is revoked next): {e}");
        }
        keeper.abort();
        let _ = m.etcd.revoke(lease).await;
        info!("resigned");
        break;
    }
    watcher.abort();
    elected.abort();
}

/// Keeps `cluster.role()` told who leads the election: a read, then a watch on the
/// election's keys; any change, error or 5 s of quiet reads again.
async fn watch_leader(etcd: Etcd, keys: Keys, cluster: Arc<Cluster>) {
    let election = keys.leader();
    let prefix = format!("{election}/");
    loop {
        // The revision first: a change after it is seen by the watch.
        let read = async {
            let (_, revision) = etcd.list(&prefix).await?;
            let leader = etcd.leader(&election).await?;
            Ok::<_, EtcdError>((leader, revision))
        };
        let revision = match read.await {
            Ok((leader, revision)) => {
                let leader = leader.map(|v| String::from_utf8_lossy(&v).into_owned());
                cluster.role().set_leader(leader, None);
                revision
            }
            Err(e) => {
                // The last leader known stays the one to try.
                let role = cluster.role();
                role.set_leader(role.leader(), Some(format!("etcd cannot be read: {e}")));
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        etcd.wait_for_change(&prefix, revision, "the election")
            .await;
    }
}

/// Renews `lease` until it is found expired (then `lost` turns true). While etcd cannot be
/// reached the lease is assumed alive: serving goes on.
async fn keep_lease(etcd: Etcd, lease: i64, ttl: Duration, lost: watch::Sender<bool>) {
    etcd.hold(lease, ttl).await;
    let _ = lost.send(true);
}

/// Keeps `members` equal to the worker records in etcd: a full read, then a watch from that
/// revision; any change or error reads again. While etcd is down the last view stays.
async fn watch_workers(etcd: Etcd, keys: Keys, members: watch::Sender<Members>) {
    let prefix = keys.workers();
    loop {
        let (kvs, revision) = match etcd.list(&prefix).await {
            Ok(r) => r,
            Err(e) => {
                warn!("cannot read the workers from etcd (will retry): {e}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let view: BTreeMap<String, bool> = kvs
            .into_iter()
            .filter_map(|(_, v)| pb::WorkerRecord::decode(v.as_slice()).ok())
            .map(|r| (r.address, r.draining))
            .collect();
        members.send_if_modified(|m| {
            let changed = m.as_ref() != Some(&view);
            *m = Some(view);
            changed
        });
        etcd.wait_for_change(&prefix, revision, "the workers").await;
    }
}
