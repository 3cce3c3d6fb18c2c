//! The job store contract (replace by id, load in submission order, every field of a record
//! back through the stored format, delete) run against the in-memory store and against a real etcd
//! (`EtcdServer`), plus what only etcd has: a second store (a restarted coordinator) sees the
//! same jobs, a corrupt record refuses to load, naming its key, and records written by other
//! versions (an older one's without a schema, a newer one's) are read or refused by job.

use std::time::Duration;

use longtake_coordinator::record::{CheckpointRef, JobPhase, JobRecord, JobSpecs, Plan};
use longtake_coordinator::store::{
    EtcdJobStore, InMemoryJobStore, JobStore, LoadedJob, RecordProblem, StoreError,
};
use longtake_proto::membership::testing::EtcdServer;
use longtake_proto::membership::EtcdConfig;
use longtake_proto::spec::{ModelDescription, SpecRequest};
use longtake_proto::RenderSpec;

fn request(id: &str) -> SpecRequest {
    SpecRequest::try_from(&RenderSpec {
        prompt: format!("a wolf howls at the moon ({id})"),
        model: "tiny".into(),
        frames: 9,
        width: 64,
        guidance_scale: 5.0,
        seed: 7,
        fps: 16,
        layout: "cfg=2".into(),
        ..Default::default()
    })
    .unwrap()
}

fn job(id: &str, submitted_at_ms: u64, priority: i32) -> JobRecord {
    JobRecord::queued(
        id.into(),
        request(id),
        priority,
        format!("shot {id}"),
        submitted_at_ms,
    )
}

/// The records of jobs loaded without a problem.
fn records(loaded: Vec<LoadedJob>) -> Vec<JobRecord> {
    loaded
        .into_iter()
        .map(|l| {
            assert_eq!(l.problem, None, "{:?}", l.record);
            l.record
        })
        .collect()
}

fn ids(jobs: &[JobRecord]) -> Vec<&str> {
    jobs.iter().map(|j| j.id.as_str()).collect()
}

/// Runs the contract against an empty `store`; returns the jobs it leaves stored.
async fn store_contract(store: &dyn JobStore) -> Vec<JobRecord> {
    assert!(store.load_all().await.unwrap().is_empty());
    // Put out of order; equal submission times order by id.
    for j in [job("j-b", 200, 0), job("j-c", 100, 5), job("j-a", 200, 1)] {
        store.put(&j).await.unwrap();
    }
    let loaded = records(store.load_all().await.unwrap());
    assert_eq!(ids(&loaded), ["j-c", "j-a", "j-b"]);
    assert_eq!(loaded[0], job("j-c", 100, 5), "every field comes back");

    // A put with a known id replaces that record; a planned and running one keeps its
    // resolved spec, plan and checkpoint.
    let request = request("j-c");
    let resolved = request
        .resolve(&ModelDescription {
            name: "tiny".into(),
            default_width: 64,
            default_height: 48,
            default_steps: 3,
            attention_heads: 2,
            ffn_dim: 64,
            ..Default::default()
        })
        .unwrap();
    let running = JobRecord {
        phase: JobPhase::Running,
        plan: Some(Plan::single(
            vec!["w1".into(), "w2".into()],
            resolved.layout,
        )),
        spec: JobSpecs::Resolved {
            request,
            resolved: Box::new(resolved),
        },
        checkpoint: Some(CheckpointRef { step: 2, groups: 1 }),
        steps_done: 2,
        steps_total: 3,
        started_at_ms: 150,
        attempts: 1,
        ..job("j-c", 100, 5)
    };
    store.put(&running).await.unwrap();
    let loaded = records(store.load_all().await.unwrap());
    assert_eq!(ids(&loaded), ["j-c", "j-a", "j-b"]);
    assert_eq!(loaded[0], running);

    // A deleted record is gone (retention); deleting it again is no error.
    store.put(&job("j-x", 300, 0)).await.unwrap();
    store.delete("j-x").await.unwrap();
    store.delete("j-x").await.unwrap();
    let loaded = records(store.load_all().await.unwrap());
    assert_eq!(ids(&loaded), ["j-c", "j-a", "j-b"]);
    loaded
}

fn etcd_config(server: &EtcdServer) -> EtcdConfig {
    EtcdConfig::new(vec![server.url().to_string()])
}

#[tokio::test]
async fn in_memory_store_keeps_the_contract() {
    store_contract(&InMemoryJobStore::new()).await;
}

#[tokio::test]
async fn etcd_store_keeps_the_contract_and_a_restarted_coordinator_sees_the_same_jobs() {
    let server = EtcdServer::start();
    let stored = {
        let store = EtcdJobStore::connect(etcd_config(&server)).await.unwrap();
        store_contract(&store).await
    };
    let restarted = EtcdJobStore::connect(etcd_config(&server)).await.unwrap();
    assert_eq!(records(restarted.load_all().await.unwrap()), stored);

    // Another farm's prefix is another set of jobs.
    let other = EtcdJobStore::connect(EtcdConfig {
        prefix: "/other-farm".into(),
        ..etcd_config(&server)
    })
    .await
    .unwrap();
    assert!(other.load_all().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_corrupt_job_record_refuses_to_load_naming_its_key() {
    let server = EtcdServer::start();
    let store = EtcdJobStore::connect(etcd_config(&server)).await.unwrap();
    store.put(&job("j-a", 100, 0)).await.unwrap();
    let mut etcd = etcd_client::Client::connect([server.url()], None)
        .await
        .unwrap();
    etcd.put("/longtake/jobs/j-bad", "{\"id\": ", None)
        .await
        .unwrap();
    match store.load_all().await {
        Err(e @ StoreError::Decode { .. }) => {
            assert!(e.to_string().contains("/longtake/jobs/j-bad"), "{e}")
        }
        other => panic!("a corrupt record gave {other:?}"),
    }
}

/// What a coordinator before the versioned format wrote: the protocol's `Job` as serde JSON,
/// no schema field (produced with `serde_json::to_string` of a `Job` by that code).
const V1_RECORD: &str = r#"{"id":"j-lz3k9q1abcd","spec":{"prompt":"a wolf howls at the moon","negative_prompt":"","model":"tiny","frames":9,"width":64,"height":64,"steps":3,"guidance_scale":5.0,"shift":null,"scheduler":"","seed":7,"fps":16,"format":0,"layout":"cfg=2"},"priority":2,"state":3,"steps_done":1,"steps_total":3,"submitted_at_ms":1700000000000,"started_at_ms":1700000001000,"finished_at_ms":0,"message":"","workers":["w1","w2"],"attempts":1,"output_bytes":0,"name":"shot 12"}"#;

#[tokio::test]
async fn etcd_records_of_an_older_version_are_read_and_of_a_newer_one_refused_by_job() {
    let server = EtcdServer::start();
    let store = EtcdJobStore::connect(etcd_config(&server)).await.unwrap();
    store.put(&job("j-a", 100, 0)).await.unwrap();
    let mut etcd = etcd_client::Client::connect([server.url()], None)
        .await
        .unwrap();
    etcd.put("/longtake/jobs/j-lz3k9q1abcd", V1_RECORD, None)
        .await
        .unwrap();
    etcd.put(
        "/longtake/jobs/j-newer",
        r#"{"schema": 99, "id": "j-newer", "submitted_at_ms": 50}"#,
        None,
    )
    .await
    .unwrap();

    let loaded = store.load_all().await.unwrap();
    let order: Vec<&str> = loaded.iter().map(|l| l.record.id.as_str()).collect();
    assert_eq!(order, ["j-newer", "j-a", "j-lz3k9q1abcd"]);
    match &loaded[0].problem {
        Some(problem @ RecordProblem::UnknownSchema { found: 99, .. }) => {
            let text = problem.to_string();
            assert!(
                text.starts_with(
                    "job j-newer: its record /longtake/jobs/j-newer has schema version 99"
                ),
                "{text}"
            )
        }
        other => panic!("a schema 99 record gave {other:?}"),
    }
    assert_eq!(loaded[0].record.phase, JobPhase::Failed);
    assert_eq!(loaded[1].problem, None);
    let v1 = &loaded[2];
    assert_eq!(v1.problem, None);
    assert_eq!(v1.record.phase, JobPhase::Running);
    assert_eq!(v1.record.name, "shot 12");
    assert_eq!(
        v1.record.plan.as_ref().map(|p| p.workers()),
        Some(vec!["w1".to_string(), "w2".to_string()])
    );

    // Written back, the migrated record is in the current format and reads the same.
    store.put(&v1.record).await.unwrap();
    let again = store.load_all().await.unwrap();
    assert_eq!(again[2], *v1);
    let raw = etcd
        .get("/longtake/jobs/j-lz3k9q1abcd", None)
        .await
        .unwrap();
    let raw: serde_json::Value = serde_json::from_slice(raw.kvs()[0].value()).unwrap();
    assert_eq!(raw["schema"], longtake_coordinator::store::SCHEMA_VERSION);
}

#[tokio::test]
async fn connecting_where_nothing_listens_fails_fast_naming_the_url() {
    let port = longtake_proto::membership::testing::free_port();
    let url = format!("http://127.0.0.1:{port}");
    // Hang guard only: the check is the error, not how fast it came.
    let guard = Duration::from_secs(60);
    let connect = EtcdJobStore::connect(EtcdConfig::new(vec![url.clone()]));
    match tokio::time::timeout(guard, connect).await {
        Err(_) => panic!("hang guard ({guard:?}): connect never returned"),
        Ok(Err(e @ StoreError::Etcd { .. })) => assert!(e.to_string().contains(&url), "{e}"),
        Ok(Err(e)) => panic!("wrong error {e}"),
        Ok(Ok(_)) => panic!("connected to a port where nothing listens"),
    }
}

/// A job history larger than one etcd response may be (the client's 4 MiB message limit: about
/// 8,800 ordinary jobs, or fewer with long prompts) loads whole, in submission order; once a
/// coordinator with such a history could not restart ("decoded message length too large").
#[tokio::test]
async fn a_history_larger_than_one_etcd_message_loads_whole() {
    let server = EtcdServer::start();
    let store = EtcdJobStore::connect(etcd_config(&server)).await.unwrap();
    let prompt = "a lighthouse keeper walks the stairs in a storm, ".repeat(78); // 3,900 chars
                                                                                 // about 8.3 KB each, 10.8 MB in all: one page of 512 records is over the limit too, so the
                                                                                 // store reads in smaller pages
    let count = 1_300;
    for i in 0..count {
        let id = format!("j-{i:04}");
        let request = SpecRequest::try_from(&RenderSpec {
            prompt: prompt.clone(),
            negative_prompt: prompt.clone(),
            model: "tiny".into(),
            frames: 9,
            guidance_scale: 5.0,
            fps: 16,
            ..Default::default()
        })
        .unwrap();
        let record = JobRecord::queued(id, request, 0, String::new(), 1_000 + i);
        store.put(&record).await.unwrap();
    }
    let loaded = records(store.load_all().await.unwrap());
    assert_eq!(loaded.len(), count as usize);
    let expected: Vec<String> = (0..count).map(|i| format!("j-{i:04}")).collect();
    assert_eq!(
        ids(&loaded),
        expected.iter().map(String::as_str).collect::<Vec<_>>()
    );
}

/// The coordinator election: one leader at a time (a second candidate is told who leads and
/// waits); when the leader's lease ends (revoked here from outside, as its expiry after a
/// partition would), the next candidate leads, the deposed one learns that another leads, and
/// its fenced writes are refused while the new leader's go through. (Before, two coordinators on one
/// etcd both scheduled and wrote.)
#[tokio::test]
async fn one_coordinator_leads_and_a_deposed_leader_cannot_write() {
    use longtake_coordinator::leadership::Leadership;
    let server = EtcdServer::start();
    let config = etcd_config(&server);
    let ttl = Duration::from_secs(2);
    let first = Leadership::campaign(&config, "http://first:7070", ttl, |leader| {
        panic!("nobody leads yet, but {leader:?} was named")
    })
    .await
    .unwrap();
    let first_store = EtcdJobStore::connect(config.clone())
        .await
        .unwrap()
        .fenced(first.fence());
    first_store.put(&job("j-1", 100, 0)).await.unwrap();

    let (told, heard) = tokio::sync::oneshot::channel();
    let second = tokio::spawn({
        let config = config.clone();
        async move {
            Leadership::campaign(&config, "http://second:7070", ttl, move |leader| {
                let _ = told.send(leader);
            })
            .await
        }
    });
    assert_eq!(heard.await.unwrap().as_deref(), Some("http://first:7070"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !second.is_finished(),
        "the second candidate waits while the first leads (its lease kept alive past its TTL)"
    );

    let mut etcd = etcd_client::Client::connect([server.url()], None)
        .await
        .unwrap();
    let candidates = etcd
        .get(
            "/longtake/coordinator/leader",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let first_lease = candidates
        .kvs()
        .iter()
        .find(|kv| kv.value() == b"http://first:7070")
        .expect("the first candidate's key")
        .lease();
    etcd.lease_revoke(first_lease).await.unwrap();

    let second = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("hang guard: the second candidate leads once the first's lease is gone")
        .unwrap()
        .unwrap();
    let why = tokio::time::timeout(Duration::from_secs(30), first.lost())
        .await
        .expect("hang guard: the deposed leader learns that it lost");
    assert!(why.contains("another coordinator leads"), "{why}");
    match first_store.put(&job("j-2", 200, 0)).await {
        Err(StoreError::NotLeader) => {}
        other => panic!("a deposed leader's write must be refused, got {other:?}"),
    }
    let second_store = EtcdJobStore::connect(config)
        .await
        .unwrap()
        .fenced(second.fence());
    second_store.put(&job("j-3", 300, 0)).await.unwrap();
    let loaded = records(second_store.load_all().await.unwrap());
    assert_eq!(ids(&loaded), ["j-1", "j-3"]);
    second.resign().await;
}
