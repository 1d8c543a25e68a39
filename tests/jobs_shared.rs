//! Bulk jobs in shared mode: three replicas (real processes, each with its own data
//! directory) on one Redis (Debian's `redis-server`) in front of one simulator. A job
//! accepted by one replica is read and cancelled through the others, and when the replica
//! running it is killed (`kill -9`) another takes it over once its lease lapses and
//! finishes it: every CPF has its line, and only a call under way at the kill can be made
//! twice.

mod common;

use std::time::Duration;

use common::process::{Proxy, start};
use common::redis::Redis;
use common::{SIM_INTERVAL, cpf};
use score_sim::{Simulator, SimulatorConfig, SimulatorHandle};

const CLIENT: &str = "jobs-shared-client-5b1d";
const OTHER: &str = "jobs-shared-other-0e77";

struct Fleet {
    replicas: Vec<Option<Proxy>>,
    sim: SimulatorHandle,
    redis: Option<Redis>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Fleet {
    async fn start() -> Fleet {
        let redis = Redis::start();
        let sim = Simulator::spawn(SimulatorConfig {
            min_interval: SIM_INTERVAL,
            penalty: Duration::from_millis(300),
            ..SimulatorConfig::default()
        })
        .await
        .expect("the simulator starts");
        let url = redis.url();
        let flags = [
            "--redis-url",
            &url,
            "--redaction-key",
            "jobs-shared-test-secret",
            "--expected-replicas",
            "3",
            "--redis-timeout",
            "200ms",
        ];
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let replicas = dirs
            .iter()
            .map(|d| Some(start(&sim, d.path(), &flags)))
            .collect();
        Fleet {
            replicas,
            sim,
            redis: Some(redis),
            _dirs: dirs,
        }
    }

    fn replica(&self, i: usize) -> &Proxy {
        self.replicas[i].as_ref().expect("a replica still running")
    }

    /// Calls the simulator received for `cpf`.
    fn calls_for(&self, cpf: &str) -> usize {
        self.sim
            .stats()
            .arrivals
            .iter()
            .filter(|a| a.cpf == cpf)
            .count()
    }
}

/// The status code of `GET path` on `proxy`.
async fn status_of(proxy: &Proxy, method: reqwest::Method, path: &str) -> u16 {
    reqwest::Client::new()
        .request(method, format!("http://{}{path}", proxy.addr))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A job accepted by replica 0 is the fleet's: readable (and only by its client) through
/// the others; `kill -9` of the replica running it stops nothing but that replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_the_fleets_and_outlives_the_replica_running_it() {
    let mut fleet = Fleet::start().await;
    let cpfs: Vec<String> = (300..340).map(cpf).collect();
    // The last CPF was looked up through another replica: its answer is in the shared cache.
    assert_eq!(fleet.replica(1).lookup(339, CLIENT).await.0, 200);
    let id = fleet.replica(0).submit(CLIENT, &cpfs).await;

    let seen = fleet.replica(1).job(&id, CLIENT).await;
    assert_eq!(seen["total"], 40, "{seen}");
    for path in [
        format!("/jobs/{id}?client_id={OTHER}"),
        format!("/jobs/{id}/results?client_id={OTHER}"),
    ] {
        assert_eq!(
            status_of(fleet.replica(2), reqwest::Method::GET, &path).await,
            404
        );
    }
    assert_eq!(
        status_of(
            fleet.replica(2),
            reqwest::Method::DELETE,
            &format!("/jobs/{id}?client_id={OTHER}")
        )
        .await,
        404
    );

    // The replica that accepted the job runs it; it dies a quarter of the way through.
    fleet.replica(2).job_reaches(&id, CLIENT, 10).await;
    fleet.replicas[0].take().unwrap().kill();

    // Another takes it over once its lease lapses; replica 2 streams it to the end.
    let lines = fleet.replica(2).job_lines(&id, CLIENT).await;
    assert_eq!(lines.len(), cpfs.len(), "every CPF has its line");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            (line["index"].as_u64(), line["status"].as_u64()),
            (Some(i as u64), Some(200)),
            "{line}"
        );
        assert_eq!(line["cpf"], cpfs[i]);
    }
    assert_eq!(lines[39]["from_cache"], true, "{}", lines[39]);
    let done = fleet.replica(1).job(&id, CLIENT).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["from_cache"], 1, "{done}");
    assert!(
        fleet.replica(1).logged("bulk job taken over")
            || fleet.replica(2).logged("bulk job taken over"),
        "a surviving replica says it took the job over"
    );
    // Only a call under way at the kill may have been made again.
    let twice: Vec<_> = cpfs.iter().filter(|c| fleet.calls_for(c) > 1).collect();
    assert!(twice.len() <= 1, "called more than once: {twice:?}");
    assert_eq!(
        fleet.calls_for(&cpfs[39]),
        1,
        "the shared cache answered it"
    );
    assert!(cpfs.iter().all(|c| fleet.calls_for(c) >= 1));
    assert_eq!(fleet.sim.stats().violations, 0);
}

/// A job cancelled through another replica than the one running it stops there at once:
/// at most the call already under way is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_through_another_replica_stops_where_it_runs() {
    let fleet = Fleet::start().await;
    let cpfs: Vec<String> = (400..460).map(cpf).collect();
    let id = fleet.replica(1).submit(CLIENT, &cpfs).await;
    fleet.replica(1).job_reaches(&id, CLIENT, 5).await;

    let reply = reqwest::Client::new()
        .delete(format!(
            "http://{}/jobs/{id}?client_id={CLIENT}",
            fleet.replica(2).addr
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let cancelled: serde_json::Value = serde_json::from_str(&reply.text().await.unwrap()).unwrap();
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    let done_then = cancelled["done"].as_u64().unwrap() as usize;

    // The replica running it hears of it (the event), and says so.
    tokio::time::timeout(Duration::from_secs(10), async {
        while !fleet
            .replica(1)
            .logged("bulk job cancelled through another replica")
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the running replica stops the job");
    assert_eq!(
        fleet.replica(1).job(&id, CLIENT).await["state"],
        "cancelled"
    );

    // Another client's job on the same replica runs to its end meanwhile: had the cancelled
    // job gone on, its items would have shared the budget with these.
    let others: Vec<String> = (500..506).map(cpf).collect();
    let other = fleet.replica(1).submit(OTHER, &others).await;
    let lines = fleet.replica(0).job_lines(&other, OTHER).await;
    assert!(lines.iter().all(|l| l["status"] == 200), "{lines:?}");

    let called = cpfs.iter().filter(|c| fleet.calls_for(c) > 0).count();
    assert!(
        called <= done_then + 1,
        "{called} CPFs of the cancelled job called, {done_then} were done at cancellation"
    );
    // Its results so far stay readable, through any replica.
    let kept = fleet.replica(0).job_lines(&id, CLIENT).await;
    assert!(!kept.is_empty() && kept.len() <= done_then + 1, "{kept:?}");
}

/// Redis gone mid-job: no item is started while it is (its result could not be kept), the
/// other replicas say so honestly (`503` with `Retry-After`), and when Redis comes back empty
/// (no persistence) the replica running the job writes it again and finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_outlives_a_redis_restart_through_the_replica_running_it() {
    let mut fleet = Fleet::start().await;
    let cpfs: Vec<String> = (600..630).map(cpf).collect();
    let id = fleet.replica(0).submit(CLIENT, &cpfs).await;
    fleet.replica(0).job_reaches(&id, CLIENT, 5).await;

    let port = fleet.redis.take().expect("Redis runs").port;
    // Every replica notices (its health check), and then refuses what needs Redis.
    for i in 0..3 {
        fleet
            .replica(i)
            .metric_reaches("score_proxy_pacing_mode{mode=\"fallback\"}", 1.0)
            .await;
    }
    let reply = reqwest::Client::new()
        .get(format!(
            "http://{}/jobs/{id}?client_id={CLIENT}",
            fleet.replica(1).addr
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 503);
    assert!(reply.headers().contains_key("retry-after"));
    let refused = reqwest::Client::new()
        .post(format!(
            "http://{}/jobs?client_id={CLIENT}",
            fleet.replica(2).addr
        ))
        .header("content-type", "text/plain")
        .body(cpf(700))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);

    // Redis back, empty, on its port: the job is written again and finishes.
    fleet.redis = Some(Redis::start_on(port));
    tokio::time::timeout(Duration::from_secs(20), async {
        while !fleet.replica(0).logged("Redis had lost a bulk job") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the replica running the job writes it again");
    fleet
        .replica(1)
        .metric_reaches("score_proxy_pacing_mode{mode=\"shared\"}", 1.0)
        .await;
    let lines = fleet.replica(1).job_lines(&id, CLIENT).await;
    assert_eq!(lines.len(), cpfs.len(), "every CPF has its line");
    assert!(lines.iter().all(|l| l["status"] == 200), "{lines:?}");
    for c in &cpfs {
        assert_eq!(fleet.calls_for(c), 1, "each CPF called once");
    }
    assert_eq!(fleet.sim.stats().violations, 0);
}
