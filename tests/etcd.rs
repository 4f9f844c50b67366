//! The etcd client (`switchyard_net::etcd`) against a real etcd: every call Switchyard makes,
//! through our own definitions of etcd's API (`proto/proto/etcd/`). Each test starts every etcd
//! in `SWITCHYARD_ETCD_BINARIES` (colon-separated; scripts/etcd-newer.sh sets Debian's 3.4 and
//! 3.5, the default is the `etcd` on the PATH), one after the other, in temporary directories.

mod common;

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use common::{runtime, EtcdServer};
use switchyard_net::etcd::{Etcd, EtcdError};
use tokio::time::{sleep, timeout};

/// The watch and election tests time what they wait for: one etcd at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `test` against a client of a fresh etcd, once for each etcd binary under test.
fn with_etcd<F: Future<Output = ()>>(test: impl Fn(Etcd) -> F) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let binaries = std::env::var("SWITCHYARD_ETCD_BINARIES").unwrap_or_else(|_| "etcd".into());
    for binary in binaries.split(':').filter(|b| !b.is_empty()) {
        eprintln!("against {binary}");
        let server = EtcdServer::start_binary(binary);
        // The client's lazy connection needs the runtime around it.
        runtime().block_on(async { test(Etcd::connect(&server.url).unwrap()).await });
    }
}

/// `future`'s output, or a failed test naming `what` if it takes longer than `limit`.
async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {limit:?}"))
}

#[test]
fn keys_are_written_read_and_listed_by_prefix() {
    with_etcd(|etcd| async move {
        assert_eq!(etcd.get("/t/a").await.unwrap(), None);
        etcd.put("/t/a", b"1".to_vec(), 0).await.unwrap();
        etcd.put("/t/b", b"2".to_vec(), 0).await.unwrap();
        etcd.put("/u", b"outside".to_vec(), 0).await.unwrap();
        etcd.put("/t/a", b"3".to_vec(), 0).await.unwrap();
        assert_eq!(etcd.get("/t/a").await.unwrap(), Some(b"3".to_vec()));
        let (kvs, revision) = etcd.list("/t/").await.unwrap();
        let expected = [("/t/a", b"3"), ("/t/b", b"2")].map(|(k, v)| (k.to_string(), v.to_vec()));
        assert_eq!(kvs, expected);
        // A new store is at revision 1; each put adds one.
        assert_eq!(revision, 5);
    });
}

#[test]
fn a_lease_holds_its_keys_while_renewed_and_drops_them_when_revoked() {
    with_etcd(|etcd| async move {
        let ttl = Duration::from_secs(2);
        let lease = etcd.grant(ttl).await.unwrap();
        assert_ne!(lease, 0);
        etcd.put("/l/k", b"v".to_vec(), lease).await.unwrap();
        etcd.keep_alive(lease).await.unwrap();

        // Renewed for longer than its time to live, the key stays.
        let holder = tokio::spawn({
            let etcd = etcd.clone();
            async move { etcd.hold(lease, ttl).await }
        });
        sleep(2 * ttl).await;
        assert!(!holder.is_finished(), "hold returned while its lease lives");
        assert_eq!(etcd.get("/l/k").await.unwrap(), Some(b"v".to_vec()));

        etcd.revoke(lease).await.unwrap();
        assert_eq!(etcd.get("/l/k").await.unwrap(), None);
        match etcd.keep_alive(lease).await {
            Err(EtcdError::LeaseExpired(l)) => assert_eq!(l, lease),
            other => panic!("renewing a revoked lease: {other:?}"),
        }
        within(2 * ttl, "hold on a revoked lease", holder)
            .await
            .unwrap();
        assert!(etcd.put("/l/k", b"v".to_vec(), lease).await.is_err());
    });
}

#[test]
fn an_unrenewed_lease_expires_with_its_keys() {
    with_etcd(|etcd| async move {
        let lease = etcd.grant(Duration::from_secs(2)).await.unwrap();
        etcd.put("/l/k", b"v".to_vec(), lease).await.unwrap();
        within(Duration::from_secs(10), "the lease's expiry", async {
            while etcd.get("/l/k").await.unwrap().is_some() {
                sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        assert!(matches!(
            etcd.keep_alive(lease).await,
            Err(EtcdError::LeaseExpired(_))
        ));
    });
}

#[test]
fn a_watch_wakes_on_changes_under_its_prefix_after_the_revision_read() {
    with_etcd(|etcd| async move {
        let (_, revision) = etcd.list("/w/").await.unwrap();
        let waiting = tokio::spawn({
            let etcd = etcd.clone();
            async move { etcd.wait_for_change("/w/", revision, "the test keys").await }
        });
        // Not before a change (a failed watch would return after a short pause), and not for
        // one outside the prefix; well before the watch's quiet period (5 s) ends, a change
        // under the prefix wakes it.
        sleep(Duration::from_millis(1500)).await;
        etcd.put("/x", b"outside".to_vec(), 0).await.unwrap();
        sleep(Duration::from_millis(500)).await;
        assert!(!waiting.is_finished(), "the watch woke without a change");
        etcd.put("/w/a", b"1".to_vec(), 0).await.unwrap();
        within(Duration::from_secs(2), "the watch", waiting)
            .await
            .unwrap();

        // A change made after the read but before the watch starts counts too.
        let (_, revision) = etcd.list("/w/").await.unwrap();
        etcd.put("/w/b", b"2".to_vec(), 0).await.unwrap();
        within(
            Duration::from_secs(2),
            "the watch from an earlier revision",
            etcd.wait_for_change("/w/", revision, "the test keys"),
        )
        .await;
    });
}

#[test]
fn leadership_passes_to_the_next_campaigner_on_resignation() {
    with_etcd(|etcd| async move {
        let limit = Duration::from_secs(5);
        assert_eq!(etcd.leader("e").await.unwrap(), None);
        let a = etcd.grant(Duration::from_secs(30)).await.unwrap();
        let b = etcd.grant(Duration::from_secs(30)).await.unwrap();
        let a_leads = within(
            limit,
            "the first campaign",
            etcd.campaign("e", a, b"a".to_vec()),
        )
        .await
        .unwrap();
        assert_eq!(etcd.leader("e").await.unwrap(), Some(b"a".to_vec()));

        let second = tokio::spawn({
            let etcd = etcd.clone();
            async move { etcd.campaign("e", b, b"b".to_vec()).await }
        });
        sleep(Duration::from_secs(1)).await;
        assert!(!second.is_finished(), "two campaigners lead at once");
        etcd.resign(a_leads).await.unwrap();
        within(limit, "the second campaign", second)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(etcd.leader("e").await.unwrap(), Some(b"b".to_vec()));

        // Leadership lasts as long as the lease that holds it.
        etcd.revoke(b).await.unwrap();
        assert_eq!(etcd.leader("e").await.unwrap(), None);
    });
}
