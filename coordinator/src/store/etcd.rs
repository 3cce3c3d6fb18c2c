//! Job records in etcd under `<prefix>/jobs/<id>`, as the JSON of [`super::format`].
//!
//! Unlike the membership, which skips a worker record it cannot read, [`JobStore::load_all`]
//! refuses with [`StoreError::Decode`] naming the key: a skipped job would be lost silently (a
//! studio's submission gone from `list`), which is worse than a coordinator that will not start
//! until the record is fixed or removed.

use super::format::{self, LoadedJob};
use super::{in_submission_order, JobStore, Result, StoreError};
use crate::leadership::Fence;
use crate::record::JobRecord;
use etcd_client::{GetOptions, TxnOp};
use longtake_proto::membership::client::{connect, Etcd};
use longtake_proto::membership::EtcdConfig;

/// Records read per request when loading (fewer when they are large).
const LOAD_PAGE: i64 = 512;

/// The end of the key range of every key starting with `prefix` (its last byte incremented).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // a prefix of 0xff bytes only: every key from it on
    vec![0]
}

pub struct EtcdJobStore {
    client: Etcd,
    /// `<prefix>/jobs/`
    jobs: String,
    endpoints: String,
    /// Writes only while this leadership holds (a coordinator of several on one etcd).
    fence: Option<Fence>,
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
            fence: None,
        })
    }

    /// This store, writing only while `fence`'s leadership holds: a write after it was lost is
    /// refused ([`StoreError::NotLeader`]) and raises the fence's flag.
    pub fn fenced(self, fence: Fence) -> Self {
        Self {
            fence: Some(fence),
            ..self
        }
    }

    /// Does `operation` (a put or a delete), inside the fence's transaction when fenced.
    async fn write(&self, operation: TxnOp) -> Result<()> {
        let Some(fence) = &self.fence else {
            self.client
                .txn(etcd_client::Txn::new().and_then([operation]))
                .await
                .map_err(|e| self.error(e))?;
            return Ok(());
        };
        let done = self
            .client
            .txn(fence.guard(operation))
            .await
            .map_err(|e| self.error(e))?;
        if !done.succeeded() {
            fence.refused();
            return Err(StoreError::NotLeader);
        }
        Ok(())
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
    async fn delete(&self, id: &str) -> Result<()> {
        let key = format!("{}{}", self.jobs, id);
        self.write(TxnOp::delete(key, None)).await
    }

    async fn put(&self, job: &JobRecord) -> Result<()> {
        let value = format::encode(job);
        let key = format!("{}{}", self.jobs, job.id);
        self.write(TxnOp::put(key, value, None)).await
    }

    /// Reads the records a page at a time, all pages at the revision of the first, so a history
    /// of any size loads (one read of every record failed once it passed the client's 4 MiB
    /// message limit: about 8,800 ordinary jobs). A page too large for one message (records
    /// with long prompts) is read again in halves.
    async fn load_all(&self) -> Result<Vec<LoadedJob>> {
        let end = prefix_end(&self.jobs);
        let mut from = self.jobs.as_bytes().to_vec();
        let mut page = LOAD_PAGE;
        let mut revision = 0;
        let mut jobs = Vec::new();
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(page)
                .with_revision(revision);
            let found = match self.client.get(from.clone(), Some(options)).await {
                Ok(found) => found,
                Err(etcd_client::Error::GRpcStatus(status))
                    if status.code() == tonic::Code::OutOfRange && page > 1 =>
                {
                    page = (page / 2).max(1);
                    continue;
                }
                Err(e) => return Err(self.error(e)),
            };
            if revision == 0 {
                revision = found.header().map_or(0, |h| h.revision());
            }
            for kv in found.kvs() {
                jobs.push(format::decode(
                    &String::from_utf8_lossy(kv.key()),
                    kv.value(),
                )?);
            }
            match found.kvs().last() {
                Some(last) if found.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        in_submission_order(&mut jobs);
        Ok(jobs)
    }
}
