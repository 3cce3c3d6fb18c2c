//! Membership in etcd: each worker's record is JSON under `<prefix>/workers/<id>`, put with a
//! lease the registration keeps alive; the coordinator reads the prefix and watches it from the
//! revision of that read.

use super::{Membership, Registration, Result, Subscription};
use crate::v1::Worker;

/// How to reach etcd and how long a silent worker stays listed.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of the farm, `/longtake` by default.
    pub prefix: String,
    /// Lease time-to-live in seconds: a worker that stops keeping alive is gone after this.
    pub lease_ttl_s: i64,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: "/longtake".into(),
            lease_ttl_s: 10,
        }
    }
}

/// Membership backed by an etcd cluster.
pub struct EtcdMembership {
    config: EtcdConfig,
}

impl EtcdMembership {
    /// Connects to etcd; fails with an error naming the endpoints when it cannot.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        todo!("issue 4: etcd membership ({:?})", config.endpoints)
    }
}

#[async_trait::async_trait]
impl Membership for EtcdMembership {
    async fn register(&self, worker: Worker) -> Result<Box<dyn Registration>> {
        todo!("{:?} {}", self.config, worker.id)
    }

    async fn list(&self) -> Result<Vec<Worker>> {
        todo!()
    }

    async fn subscribe(&self) -> Result<Subscription> {
        todo!()
    }
}
