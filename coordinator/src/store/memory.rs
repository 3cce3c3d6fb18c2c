//! Job records in memory, for the embedded farm (they end with the process).

use std::collections::HashMap;
use std::sync::Mutex;

use longtake_proto::Job;

use super::{JobStore, Result};

#[derive(Default)]
pub struct InMemoryJobStore {
    jobs: Mutex<HashMap<String, Job>>,
}

impl InMemoryJobStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait::async_trait]
impl JobStore for InMemoryJobStore {
    async fn put(&self, job: &Job) -> Result<()> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.insert(job.id.clone(), job.clone());
        Ok(())
    }

    async fn load_all(&self) -> Result<Vec<Job>> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Job> = jobs.values().cloned().collect();
        all.sort_by(|a, b| (a.submitted_at_ms, &a.id).cmp(&(b.submitted_at_ms, &b.id)));
        Ok(all)
    }
}
