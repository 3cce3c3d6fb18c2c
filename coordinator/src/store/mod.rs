//! Job records: every job the coordinator accepted, with its spec, priority and state, kept so
//! that a restarted coordinator still lists (and re-queues) what it had. Both stores keep the
//! same versioned JSON ([`format`]): in etcd under `<prefix>/jobs/<id>` ([`EtcdJobStore`]) or in
//! memory for the embedded farm ([`InMemoryJobStore`]).

mod etcd;
pub mod format;
mod memory;

pub use etcd::EtcdJobStore;
pub use format::{LoadedJob, RecordProblem, StoredJob, SCHEMA_VERSION};
pub use memory::InMemoryJobStore;

use crate::record::JobRecord;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "job store in etcd at {endpoints}: {source} ({})",
        longtake_proto::membership::etcd_hint(endpoints, source)
    )]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "job store: the write was refused: this coordinator's term as leader ended (its lease \
         expired, or another coordinator leads); it is written again once this one leads again"
    )]
    NotLeader,
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
    async fn put(&self, job: &JobRecord) -> Result<()>;

    /// Every stored job, in submission order (`submitted_at_ms`, then id); a record that can be
    /// listed but not run comes back with its problem.
    async fn load_all(&self) -> Result<Vec<LoadedJob>>;

    /// Deletes the job's record (retention); deleting one that is not there is no error.
    async fn delete(&self, id: &str) -> Result<()>;
}

/// Sorts loaded jobs into submission order (`submitted_at_ms`, then id).
fn in_submission_order(jobs: &mut [LoadedJob]) {
    jobs.sort_by(|a, b| {
        (a.record.submitted_at_ms, &a.record.id).cmp(&(b.record.submitted_at_ms, &b.record.id))
    });
}
