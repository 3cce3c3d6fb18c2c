//! Job records in etcd under `<prefix>/jobs/<id>`, as JSON.

use longtake_proto::membership::EtcdConfig;
use longtake_proto::Job;

use super::{JobStore, Result};

pub struct EtcdJobStore {
    config: EtcdConfig,
}

impl EtcdJobStore {
    /// Connects to etcd (only `endpoints` and `prefix` of the config are used).
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        todo!("issue 4: etcd job store {:?}", config.endpoints)
    }
}

#[async_trait::async_trait]
impl JobStore for EtcdJobStore {
    async fn put(&self, job: &Job) -> Result<()> {
        todo!("{:?} {}", self.config, job.id)
    }

    async fn load_all(&self) -> Result<Vec<Job>> {
        todo!()
    }
}
