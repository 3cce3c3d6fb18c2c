//! Cluster membership: which workers are alive, where they listen, what they can run and whether
//! they are free. A worker registers its [`Worker`] record and keeps it alive; the coordinator
//! lists and watches the records. Two implementations: [`EtcdMembership`] (records under
//! `/longtake/workers/<id>`, each bound to a lease the worker keeps alive, so a worker that dies
//! disappears when its lease expires) and [`InProcessMembership`] for the embedded farm of
//! `longtake render` without a coordinator.

pub mod client;
pub use client::hint as etcd_hint;
mod etcd;
mod memory;
#[cfg(feature = "testing")]
pub mod testing;

pub use etcd::{EtcdConfig, EtcdMembership};
pub use memory::InProcessMembership;

use crate::v1::Worker;

/// Everything that can go wrong talking to the membership store.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// etcd could not be reached or refused a request.
    #[error("etcd at {endpoints}: {source} ({})", client::hint(endpoints, source))]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    /// A record under the workers' prefix is not a worker record. The etcd membership logs this
    /// and skips the record rather than failing: one bad key must not hide the farm.
    #[error("worker record {key} is not valid JSON of a worker: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// Another live worker already uses this id.
    #[error("worker id {0} is already registered by a live worker; give this one another --id")]
    DuplicateId(String),
    /// The registration ended (left, or its keep-alive gave up).
    #[error("the registration of worker {0} has ended")]
    Ended(String),
}

pub type Result<T> = std::result::Result<T, MembershipError>;

/// A change seen by [`Membership::subscribe`].
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipEvent {
    /// A worker joined or changed its record.
    Put(Worker),
    /// The worker with this id left or its lease expired.
    Left(String),
}

/// The live workers at subscription time and every change after it, in order. The receiver
/// closes when the watch breaks (e.g. etcd went away); subscribe again to resynchronise.
pub struct Subscription {
    pub workers: Vec<Worker>,
    pub events: tokio::sync::mpsc::Receiver<MembershipEvent>,
}

/// Where workers announce themselves and the coordinator finds them.
#[async_trait::async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Publishes `worker` (its `id` is the key) and keeps it alive until the registration leaves
    /// or is dropped. Fails with [`MembershipError::DuplicateId`] if a live worker has the id.
    async fn register(&self, worker: Worker) -> Result<Box<dyn Registration>>;

    /// Every live worker, sorted by id.
    async fn list(&self) -> Result<Vec<Worker>>;

    /// The live workers now and a stream of every change after that snapshot.
    async fn subscribe(&self) -> Result<Subscription>;
}

/// A worker's live record. Dropping it stops the keep-alive (the record then expires with its
/// lease in etcd, or goes at once in process); [`Registration::leave`] removes it at once.
#[async_trait::async_trait]
pub trait Registration: Send + Sync {
    /// Replaces the published record (e.g. its state going idle → busy); same id.
    async fn update(&self, worker: Worker) -> Result<()>;

    /// Removes the record now.
    async fn leave(self: Box<Self>) -> Result<()>;
}
