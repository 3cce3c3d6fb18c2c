//! Job records in etcd under `<prefix>/jobs/<id>`, as the JSON of [`super::format`].
//!
//! Unlike the membership, which skips a worker record it cannot read, [`JobStore::load_all`]
//! refuses with [`StoreError::Decode`] naming the key: a skipped job would be lost silently (a
//! studio's submission gone from `list`), which is worse than a coordinator that will not start
//! until the record is fixed or removed.

use super::format::{self, LoadedJob};
use super::{in_submission_order, JobStore, Result, StoreError};
use crate::record::JobRecord;
use etcd_client::{Client, GetOptions};
use longtake_proto::membership::client::{bounded, connect};
use longtake_proto::membership::EtcdConfig;

pub struct EtcdJobStore {
    client: Client,
    /// `<prefix>/jobs/`
    jobs: String,
    endpoints: String,
}

impl EtcdJobStore {
    /// Connects to etcd (only `endpoints` and `prefix` of the config are used); fails within a
    /// few seconds with an error naming the endpoints when it cannot.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        let endpoints = config.endpoints_text();
        let client = connect(&config).await.map_err(|source| StoreError::Etcd {
            endpoints: endpoints.clone(),
            source,
        })?;
        Ok(Self {
            client,
            jobs: config.keys_of("jobs"),
            endpoints,
        })
    }

    fn error(&self, source: etcd_client::Error) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            source,
        }
    }
}

#[async_trait::async_trait]
impl JobStore for EtcdJobStore {
    async fn put(&self, job: &JobRecord) -> Result<()> {
        let value = format::encode(job);
        let key = format!("{}{}", self.jobs, job.id);
        bounded(self.client.clone().put(key, value, None))
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn load_all(&self) -> Result<Vec<LoadedJob>> {
        let found = bounded(
            self.client
                .clone()
                .get(self.jobs.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await
        .map_err(|e| self.error(e))?;
        let mut jobs = found
            .kvs()
            .iter()
            .map(|kv| format::decode(&String::from_utf8_lossy(kv.key()), kv.value()))
            .collect::<Result<Vec<LoadedJob>>>()?;
        in_submission_order(&mut jobs);
        Ok(jobs)
    }
}
