//! The farm `render` starts in this process when no coordinator is named: a
//! [`LocalFarm`] (coordinator with in-process membership and an in-memory job store, local worker
//! daemons, all talking gRPC over loopback exactly as a real farm does) with the CLI's model,
//! device and dtype, and its artifacts in a temporary directory.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::task::Poll;
use std::time::Duration;

use anyhow::{Context, Result};
use longtake_cli::local::{LocalFarm, Served};
use longtake_coordinator::placement::NODE_LABEL;
use longtake_worker::daemon::{models, DaemonConfig, ModelSource};

/// How a worker waits for its task after the coordinator reserved it.
const RESERVATION_TIMEOUT: Duration = Duration::from_secs(60);

/// What the embedded farm runs.
#[derive(Debug, Clone)]
pub struct FarmOptions {
    pub workers: usize,
    /// `tiny` or a checkpoint directory; the workers serve it under this same name, so the
    /// spec's `model` needs no translation.
    pub model: String,
    pub device: String,
    pub dtype: Option<String>,
}

/// A running embedded farm.
pub struct Farm {
    url: String,
    /// The coordinator first: stopping it first abandons a task still running (after a second
    /// Ctrl-C, say), so no worker then drains a render nobody waits for.
    parts: Vec<Served>,
    _artifacts: tempfile::TempDir,
}

impl Farm {
    /// Starts the coordinator, then the workers one by one; a worker that cannot start (a bad
    /// device, a broken checkpoint) fails here, before anything is submitted.
    pub async fn start(options: FarmOptions) -> Result<Self> {
        let artifacts = tempfile::Builder::new()
            .prefix("longtake-artifacts-")
            .tempdir()
            .context("cannot create a temporary artifact directory")?;
        let local = LocalFarm::new(artifacts.path());
        let (_, coordinator) = local.coordinator().await.context("embedded coordinator")?;
        let url = coordinator.url().to_string();
        let mut parts = vec![coordinator];
        for rank in 0..options.workers {
            let config = worker_config(&options, rank);
            let what = format!("embedded worker {}", config.id);
            parts.push(local.worker(config).await.context(what)?);
        }
        Ok(Self {
            url,
            parts,
            _artifacts: artifacts,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Resolves when a part of the farm stopped on its own, with why: the render cannot go on,
    /// and waiting for it would hang.
    pub async fn failure(&mut self) -> anyhow::Error {
        let mut ended: Vec<_> = self.parts.iter_mut().map(|p| Box::pin(p.ended())).collect();
        let why = std::future::poll_fn(|cx| {
            ended
                .iter_mut()
                .find_map(|part| match part.as_mut().poll(cx) {
                    Poll::Ready(why) => Some(why),
                    Poll::Pending => None,
                })
                .map_or(Poll::Pending, Poll::Ready)
        })
        .await;
        anyhow::Error::new(why).context("the embedded farm")
    }

    /// Stops the coordinator, then the workers (they finish or hand back their task and leave),
    /// and removes the artifacts.
    pub async fn shutdown(self) {
        for part in self.parts {
            let _ = part.stop().await;
        }
    }
}

fn worker_config(options: &FarmOptions, rank: usize) -> DaemonConfig {
    let model = match options.model.as_str() {
        models::TOY => ModelSource::Toy,
        models::TINY => ModelSource::Tiny,
        dir => ModelSource::Checkpoint {
            name: dir.to_string(),
            dir: PathBuf::from(dir),
        },
    };
    DaemonConfig {
        device: options.device.clone(),
        dtype: options.dtype.clone(),
        models: vec![model],
        labels: BTreeMap::from([(NODE_LABEL.to_string(), "local".to_string())]),
        reservation_timeout: RESERVATION_TIMEOUT,
        ..DaemonConfig::new(format!("local-{rank}"), "127.0.0.1")
    }
}
