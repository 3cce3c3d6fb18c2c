//! Job records in memory, for the embedded farm (they end with the process). They are kept in
//! the stored format, so the embedded farm reads and writes records as a deployed one does.

use std::collections::HashMap;
use std::sync::Mutex;

use super::format::{self, LoadedJob};
use super::{in_submission_order, JobStore, Result};
use crate::record::JobRecord;

#[derive(Default)]
pub struct InMemoryJobStore {
    /// Encoded records by job id.
    jobs: Mutex<HashMap<String, Vec<u8>>>,
}

impl InMemoryJobStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait::async_trait]
impl JobStore for InMemoryJobStore {
    async fn put(&self, job: &JobRecord) -> Result<()> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.insert(job.id.clone(), format::encode(job));
        Ok(())
    }

    async fn load_all(&self) -> Result<Vec<LoadedJob>> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = jobs
            .iter()
            .map(|(id, bytes)| format::decode(id, bytes))
            .collect::<Result<Vec<LoadedJob>>>()?;
        in_submission_order(&mut all);
        Ok(all)
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.remove(id);
        Ok(())
    }
}
