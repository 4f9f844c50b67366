//! A worker's membership of a cluster kept in etcd: its record under
//! `/switchyard/<cluster>/workers/<address>`, attached to a lease it renews every third of the
//! lease's time to live. If the worker dies or freezes the lease runs out and etcd deletes
//! the record: that is how the coordinator learns, within the time to live. If etcd itself is
//! down the worker keeps serving and keeps trying; a lease that expired meanwhile is replaced.
//!
//! Draining: when asked to stop, the worker marks its record `draining`, refuses new
//! assignments, and waits until the coordinator releases its part (or the grace period ends)
//! before it gives up its lease.
//!
//! The worker also watches the placement the leader publishes (`/switchyard/<cluster>/placement`);
//! its parts still come by `Assign` from the leader. A published epoch fences off older ones
//! at once (steps and assignments of older placements are refused, whoever sends them), and a
//! placement that leaves this worker out makes it drop a part of an older placement: its
//! memory is freed and it reports not ready until it is assigned again.

use std::future::Future;
use std::time::Duration;

use prost::Message;
use switchyard_proto::v1 as pb;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::service::WorkerControl;
use switchyard_net::etcd::{Etcd, EtcdError, RETRY};
use switchyard_net::keys::Keys;

/// How a worker registers.
#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    pub keys: Keys,
    pub record: pb::WorkerRecord,
    /// The lease's time to live: how long a dead worker stays registered.
    pub ttl: Duration,
    /// How long a draining worker waits to be released.
    pub grace: Duration,
}

/// Registers the worker and keeps it registered until `stop` resolves, then drains it.
/// Returns once the worker may exit.
pub async fn run(
    etcd: Etcd,
    config: RegistrationConfig,
    control: WorkerControl,
    stop: impl Future<Output = ()>,
) {
    let key = config.keys.worker(&config.record.address);
    let renew = config.ttl / 3;
    let placement = tokio::spawn(watch_placement(
        etcd.clone(),
        config.keys.clone(),
        config.record.address.clone(),
        control.clone(),
    ));
    let mut record = config.record.clone();
    tokio::pin!(stop);
    // Registered and renewing until asked to stop.
    let lease = loop {
        let id = match register(&etcd, &key, &record, config.ttl).await {
            Ok(id) => id,
            Err(e) => {
                warn!("cannot register in etcd (will retry): {e}");
                tokio::select! {
                    _ = &mut stop => break None,
                    _ = tokio::time::sleep(renew) => continue,
                }
            }
        };
        info!(key = %key, lease = format!("{id:x}"), "registered in etcd");
        tokio::select! {
            _ = &mut stop => break Some(id),
            _ = etcd.hold(id, config.ttl) => warn!("the etcd lease expired; registering again"),
        }
    };

    info!("draining: waiting to be released");
    control.start_draining();
    record.draining = true;
    let deadline = Instant::now() + config.grace;
    let mut marked = false;
    let released = control.released();
    tokio::pin!(released);
    loop {
        if !marked {
            if let Some(id) = lease {
                marked = etcd.put(&key, record.encode_to_vec(), id).await.is_ok();
            }
        }
        tokio::select! {
            _ = &mut released => {
                info!("released");
                break;
            }
            _ = tokio::time::sleep_until(deadline) => {
                warn!("not released within the grace period ({:?}); stopping", config.grace);
                break;
            }
            _ = tokio::time::sleep(renew) => {
                if let Some(id) = lease {
                    let _ = etcd.keep_alive(id).await;
                }
            }
        }
    }
    placement.abort();
    if let Some(id) = lease {
        if let Err(e) = etcd.revoke(id).await {
            warn!("cannot revoke the etcd lease (it will expire): {e}");
        }
    }
}

/// Follows the published placement: a read, then a watch from that revision; a change, an
/// error or 5 s of quiet reads it again. While etcd is down nothing changes.
pub async fn watch_placement(etcd: Etcd, keys: Keys, address: String, control: WorkerControl) {
    let key = keys.placement();
    loop {
        let revision = match etcd.list(&key).await {
            Ok((kvs, revision)) => {
                let record = kvs
                    .into_iter()
                    .find(|(k, _)| *k == key)
                    .and_then(|(_, v)| pb::PlacementRecord::decode(v.as_slice()).ok());
                if let Some(r) = record {
                    apply_placement(&r, &address, &control);
                }
                revision
            }
            Err(e) => {
                warn!("cannot read the placement from etcd (will retry): {e}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        etcd.wait_for_change(&key, revision, "the placement").await;
    }
}

/// What a published placement means for the worker at `address`.
pub fn apply_placement(r: &pb::PlacementRecord, address: &str, control: &WorkerControl) {
    let before = control.fence();
    let included = r.workers.iter().any(|w| w == address);
    if let Some(held) = control.placement_published(r.epoch, included) {
        info!(
            held,
            published = r.epoch,
            leader = %r.leader,
            "released: placement {} leaves this worker out; its part of placement {held} is dropped, not ready until assigned again",
            r.epoch
        );
    }
    if r.epoch > before {
        info!(
            fence = r.epoch,
            "placement {} published: steps of older placements are refused", r.epoch
        );
    }
}

async fn register(
    etcd: &Etcd,
    key: &str,
    record: &pb::WorkerRecord,
    ttl: Duration,
) -> Result<i64, EtcdError> {
    let id = etcd.grant(ttl).await?;
    etcd.put(key, record.encode_to_vec(), id).await?;
    Ok(id)
}
