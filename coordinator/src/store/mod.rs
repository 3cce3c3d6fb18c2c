//! Job records: every job the coordinator accepted, with its spec, priority and state, kept so
//! that a restarted coordinator still lists (and re-queues) what it had. Records are the `Job`
//! messages of the protocol, stored as JSON: in etcd under `<prefix>/jobs/<id>`
//! ([`EtcdJobStore`]) or in memory for the embedded farm ([`InMemoryJobStore`]).

mod etcd;
mod memory;

pub use etcd::EtcdJobStore;
pub use memory::InMemoryJobStore;

use longtake_proto::Job;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store in etcd at {endpoints}: {source} (is etcd running there?)")]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("job record {key} is not valid JSON of a job: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Where job records live.
#[async_trait::async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Writes the job's record (creates or replaces it by id).
    async fn put(&self, job: &Job) -> Result<()>;

    /// Every stored job, in submission order (`submitted_at_ms`, then id).
    async fn load_all(&self) -> Result<Vec<Job>>;
}
