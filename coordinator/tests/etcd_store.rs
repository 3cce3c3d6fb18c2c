//! The job store contract (replace by id, load in submission order) run against the in-memory
//! store and against a real etcd (`EtcdServer`), plus what only etcd has: a second store (a
//! restarted coordinator) sees the same jobs, and a corrupt record refuses to load, naming its
//! key.

use std::time::{Duration, Instant};

use longtake_coordinator::store::{EtcdJobStore, InMemoryJobStore, JobStore, StoreError};
use longtake_proto::membership::testing::EtcdServer;
use longtake_proto::membership::EtcdConfig;
use longtake_proto::{Job, JobState, RenderSpec};

fn job(id: &str, submitted_at_ms: u64, priority: i32) -> Job {
    Job {
        id: id.into(),
        spec: Some(RenderSpec {
            prompt: format!("a wolf howls at the moon ({id})"),
            model: "tiny".into(),
            frames: 9,
            width: 64,
            height: 64,
            steps: 3,
            guidance_scale: 5.0,
            seed: 7,
            ..Default::default()
        }),
        priority,
        state: JobState::Queued as i32,
        submitted_at_ms,
        name: format!("shot {id}"),
        ..Default::default()
    }
}

fn ids(jobs: &[Job]) -> Vec<&str> {
    jobs.iter().map(|j| j.id.as_str()).collect()
}

/// Runs the contract against an empty `store`; returns the jobs it leaves stored.
async fn store_contract(store: &dyn JobStore) -> Vec<Job> {
    assert!(store.load_all().await.unwrap().is_empty());
    // Put out of order; equal submission times order by id.
    for j in [job("j-b", 200, 0), job("j-c", 100, 5), job("j-a", 200, 1)] {
        store.put(&j).await.unwrap();
    }
    let loaded = store.load_all().await.unwrap();
    assert_eq!(ids(&loaded), ["j-c", "j-a", "j-b"]);
    assert_eq!(loaded[0], job("j-c", 100, 5), "every field comes back");

    // A put with a known id replaces that record.
    let running = Job {
        state: JobState::Running as i32,
        steps_done: 2,
        steps_total: 3,
        started_at_ms: 150,
        workers: vec!["w1".into(), "w2".into()],
        attempts: 1,
        ..job("j-c", 100, 5)
    };
    store.put(&running).await.unwrap();
    let loaded = store.load_all().await.unwrap();
    assert_eq!(ids(&loaded), ["j-c", "j-a", "j-b"]);
    assert_eq!(loaded[0], running);
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
    assert_eq!(restarted.load_all().await.unwrap(), stored);

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

#[tokio::test]
async fn connecting_where_nothing_listens_fails_fast_naming_the_url() {
    let port = longtake_proto::membership::testing::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    match EtcdJobStore::connect(EtcdConfig::new(vec![url.clone()])).await {
        Err(e @ StoreError::Etcd { .. }) => assert!(e.to_string().contains(&url), "{e}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("connected to a port where nothing listens"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
