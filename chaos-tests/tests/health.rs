//! Health under a partition: a coordinator cut off from the quorum reports
//! NOT_SERVING on `grpc.health.v1` (and 503 on `/readyz`) while it stays
//! alive, and SERVING again once the partition heals. Both the old leader
//! (deposed in its own eyes only after it fails to confirm a read index) and
//! a follower are cut off in turn.

#[macro_use]
mod common;

use std::time::Duration;

use sandfleet_testkit::health::{self, ServingStatus, Watch, LIVENESS, SERVER};
use sandfleet_testkit::{ClusterBuilder, Target};

use common::start;

/// How long a member may take to notice it lost (or regained) its quorum:
/// readiness is checked every 1 s (0.25 s while not ready) with a 3 s bound on
/// the read barrier, plus an election after the heal.
const HEALTH_BOUND: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_cut_off_from_the_quorum_is_not_serving_until_it_heals() {
    require_facilities!();
    let builder = ClusterBuilder::new().coordinators(3).agents(0).health_listeners(true).metrics_listeners(true);
    let mut cluster = start(builder).await;
    for i in 0..3 {
        let addr = cluster.health_addr(Target::Coordinator(i)).expect("a health listener");
        health::wait_for(&addr, SERVER, ServingStatus::Serving, HEALTH_BOUND).await.unwrap();
    }

    let leader = cluster.status().await.unwrap().leader_id;
    let li = cluster.coordinator_index(leader).expect("a leader");
    let follower = (li + 1) % 3;
    for (what, i) in [("the leader", li), ("a follower", follower)] {
        let addr = cluster.health_addr(Target::Coordinator(i)).unwrap();
        let metrics = cluster.metrics_addr(Target::Coordinator(i)).expect("a metrics listener");
        let mut watch = Watch::open(&addr, SERVER).await.unwrap();
        assert_eq!(watch.next(HEALTH_BOUND).await.unwrap(), Some(ServingStatus::Serving), "{what}");
        assert_eq!(http_status(&metrics, "/readyz").await, 200, "{what}");

        cluster.isolate_coordinator(i).await.unwrap();
        watch.until(ServingStatus::NotServing, HEALTH_BOUND).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        // Not ready, but alive: restarting it would not help.
        assert_eq!(health::check(&addr, LIVENESS).await.unwrap(), ServingStatus::Serving, "{what}");
        assert_eq!(http_status(&metrics, "/readyz").await, 503, "{what}");
        assert_eq!(http_status(&metrics, "/healthz").await, 200, "{what}");
        // The two others still form a quorum and stay ready.
        for j in (0..3).filter(|j| *j != i) {
            let other = cluster.health_addr(Target::Coordinator(j)).unwrap();
            health::wait_for(&other, SERVER, ServingStatus::Serving, HEALTH_BOUND).await.unwrap();
        }

        cluster.heal().await.unwrap();
        watch
            .until(ServingStatus::Serving, HEALTH_BOUND)
            .await
            .unwrap_or_else(|e| panic!("{what} after the heal: {e}"));
        assert_eq!(http_status(&metrics, "/readyz").await, 200, "{what} after the heal");
    }
    cluster.shutdown().await.unwrap();
}

/// The HTTP status of `GET path` on a metrics listener.
async fn http_status(addr: &str, path: &str) -> u16 {
    sandfleet_testkit::prometheus::http_get(addr, path).await.unwrap_or_else(|e| panic!("GET {addr}{path}: {e}")).0
}
