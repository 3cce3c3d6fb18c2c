//! Membership in etcd: each worker's record is JSON under `<prefix>/workers/<id>`, put with a
//! lease the registration keeps alive; the coordinator reads the prefix and watches it from the
//! revision of that read.
//!
//! Choices worth knowing:
//! - A record that is not valid JSON of a worker is skipped with a warning by [`Membership::list`]
//!   and [`Membership::subscribe`]: one bad key (written by hand, or by a newer version) must not
//!   hide the rest of the farm from the coordinator.
//! - The key is authoritative for the id: a record's `id` field is replaced by the id in its key,
//!   so that `Put` and `Left` events of one worker always agree.
//! - A registration whose lease is lost (etcd restarted, a partition longer than the TTL, the
//!   lease revoked by hand) grants a new lease and puts its latest record again, with a warning;
//!   if another worker took the id meanwhile it gives up with an error log instead.
//! - A subscription's receiver closes when its watch fails (etcd gone, history compacted past
//!   the watch): the subscriber subscribes again to get a fresh snapshot.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp, WatchOptions,
    WatchResponse, WatchStream,
};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;

use super::client::{bounded, connect, Etcd};
use super::{Membership, MembershipError, MembershipEvent, Registration, Result, Subscription};
use crate::v1::Worker;

/// How many events a subscriber may lag behind; beyond that the watch waits for it (etcd keeps
/// the history), so nothing is dropped.
const SUBSCRIBER_BUFFER: usize = 1024;

/// How to reach etcd and how long a silent worker stays listed.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of the farm, `/longtake` by default.
    pub prefix: String,
    /// Lease time-to-live in seconds: a worker that stops keeping alive is gone after this.
    pub lease_ttl_s: i64,
    /// TLS to etcd (`https://` endpoints): the CA of etcd's certificate and, for an etcd with
    /// `--client-cert-auth`, this process's certificate (`crate::tls::etcd_client`).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: "/longtake".into(),
            lease_ttl_s: 10,
            tls: None,
        }
    }
}

/// Membership backed by an etcd cluster.
pub struct EtcdMembership {
    config: EtcdConfig,
    client: Etcd,
}

impl EtcdMembership {
    /// Connects to etcd; fails within a few seconds with an error naming the endpoints when it
    /// cannot.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        let client = connect(&config).await.map_err(|e| etcd_error(&config, e))?;
        Ok(Self { config, client })
    }

    fn prefix(&self) -> String {
        self.config.keys_of("workers")
    }
}

fn etcd_error(config: &EtcdConfig, source: etcd_client::Error) -> MembershipError {
    MembershipError::Etcd {
        endpoints: config.endpoints_text(),
        source,
    }
}

fn encode(worker: &Worker) -> Vec<u8> {
    serde_json::to_vec(worker).expect("a worker record always serialises")
}

/// The worker of a record under `prefix`, or `None` (with a warning) if it is not one.
fn decode(prefix: &str, kv: &KeyValue) -> Option<Worker> {
    let key = String::from_utf8_lossy(kv.key());
    let id = key.strip_prefix(prefix)?;
    match serde_json::from_slice::<Worker>(kv.value()) {
        Ok(worker) => Some(Worker {
            id: id.to_string(),
            ..worker
        }),
        Err(source) => {
            let error = MembershipError::Decode {
                key: key.to_string(),
                source,
            };
            tracing::warn!("skipping it: {error}");
            None
        }
    }
}

/// The membership events of one watch response, in order.
fn events(prefix: &str, response: &WatchResponse) -> Vec<MembershipEvent> {
    response
        .events()
        .iter()
        .filter_map(|event| {
            let kv = event.kv()?;
            match event.event_type() {
                EventType::Put => decode(prefix, kv).map(MembershipEvent::Put),
                EventType::Delete => {
                    let key = String::from_utf8_lossy(kv.key());
                    let id = key.strip_prefix(prefix)?;
                    Some(MembershipEvent::Left(id.to_string()))
                }
            }
        })
        .collect()
}

#[async_trait::async_trait]
impl Membership for EtcdMembership {
    async fn register(&self, worker: Worker) -> Result<Box<dyn Registration>> {
        let key = format!("{}{}", self.prefix(), worker.id);
        let client = self.client.clone();
        let lease = client
            .lease_grant(self.config.lease_ttl_s)
            .await
            .map_err(|e| etcd_error(&self.config, e))?;
        // Created only if the key is absent: checking and putting in one transaction leaves no
        // window for a second worker with the same id.
        let create = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                encode(&worker),
                Some(PutOptions::new().with_lease(lease.id())),
            )]);
        let created = client.txn(create).await;
        if !matches!(created, Ok(ref r) if r.succeeded()) {
            let _ = client.lease_revoke(lease.id()).await;
            return Err(match created {
                Ok(_) => MembershipError::DuplicateId(worker.id),
                Err(e) => etcd_error(&self.config, e),
            });
        }
        let shared = Arc::new(Shared {
            config: self.config.clone(),
            client,
            key,
            id: worker.id.clone(),
            current: Mutex::new(Current {
                worker,
                lease: lease.id(),
                ttl_s: lease.ttl(),
                ended: false,
                unpublished: false,
            }),
        });
        let keeper = tokio::spawn(keep_alive(shared.clone()));
        Ok(Box::new(EtcdRegistration { shared, keeper }))
    }

    async fn list(&self) -> Result<Vec<Worker>> {
        let prefix = self.prefix();
        let client = self.client.clone();
        let found = client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| etcd_error(&self.config, e))?;
        let mut workers: Vec<Worker> = found
            .kvs()
            .iter()
            .filter_map(|kv| decode(&prefix, kv))
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(workers)
    }

    async fn subscribe(&self) -> Result<Subscription> {
        let prefix = self.prefix();
        let client = self.client.clone();
        let fail = |e| etcd_error(&self.config, e);
        let snapshot = client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(fail)?;
        let revision = snapshot.header().map(|h| h.revision()).unwrap_or(0);
        let mut workers: Vec<Worker> = snapshot
            .kvs()
            .iter()
            .filter_map(|kv| decode(&prefix, kv))
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));

        // From the revision after the read: no change is missed or seen twice.
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut watch = client
            .watch(prefix.clone(), Some(options))
            .await
            .map_err(fail)?;
        let first = bounded(watch.message()).await.map_err(fail)?;
        let (tx, events_rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        match first {
            Some(response) if !response.canceled() => {
                for event in events(&prefix, &response) {
                    let _ = tx.send(event).await;
                }
            }
            other => {
                let reason = other
                    .map(|r| r.cancel_reason().to_string())
                    .unwrap_or_else(|| "the watch stream ended at once".into());
                return Err(fail(etcd_client::Error::WatchError(reason)));
            }
        }
        tokio::spawn(forward(watch, prefix, tx, self.config.endpoints_text()));
        Ok(Subscription {
            workers,
            events: events_rx,
        })
    }
}

/// Passes a watch's events on until the watch fails or the subscriber goes away; either way the
/// channel closes, which is how the subscriber learns to resubscribe.
async fn forward(
    mut watch: WatchStream,
    prefix: String,
    tx: mpsc::Sender<MembershipEvent>,
    endpoints: String,
) {
    loop {
        let message = tokio::select! {
            message = watch.message() => message,
            _ = tx.closed() => return,
        };
        let response = match message {
            Ok(Some(response)) if !response.canceled() => response,
            Ok(Some(response)) => {
                tracing::warn!(
                    "watch of {prefix} at etcd {endpoints} cancelled ({}); closing the subscription",
                    response.cancel_reason()
                );
                return;
            }
            Ok(None) => {
                tracing::warn!(
                    "watch of {prefix} at etcd {endpoints} ended; closing the subscription"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(
                    "watch of {prefix} at etcd {endpoints} failed: {e}; closing the subscription"
                );
                return;
            }
        };
        for event in events(&prefix, &response) {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// What a registration and its keep-alive task share.
struct Shared {
    config: EtcdConfig,
    client: Etcd,
    key: String,
    id: String,
    /// Held across every write of the record, so that an update and a lease renewal never
    /// interleave.
    current: Mutex<Current>,
}

struct Current {
    /// The latest record, put again when the lease is renewed.
    worker: Worker,
    lease: i64,
    /// The TTL etcd granted (it may raise a short one to its minimum).
    ttl_s: i64,
    /// Left, or the id was taken by another worker while the lease was lost.
    ended: bool,
    /// The last update of the record did not reach etcd (an outage shorter than the lease):
    /// the keep-alive puts `worker` again once etcd answers, so no state stays stale.
    unpublished: bool,
}

/// Why a keep-alive stream stopped holding its lease.
enum Stopped {
    /// etcd no longer knows the lease: its record is gone.
    LeaseGone,
    /// An update renewed the lease; keep the new one alive instead.
    LeaseChanged,
    /// The stream broke (etcd unreachable?); the lease may still be alive.
    Broken(etcd_client::Error),
}

impl Shared {
    fn period(ttl_s: i64) -> Duration {
        Duration::from_millis((ttl_s.max(1) as u64) * 1000 / 3)
    }

    /// Grants a fresh lease and puts the latest record with it, unless another worker took the
    /// id while the old lease was gone (then the registration ends).
    async fn renew(&self, current: &mut Current) -> Result<()> {
        let fail = |e| etcd_error(&self.config, e);
        let client = self.client.clone();
        let lease = client
            .lease_grant(self.config.lease_ttl_s)
            .await
            .map_err(fail)?;
        let put = Txn::new()
            .when([Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                self.key.clone(),
                encode(&current.worker),
                Some(PutOptions::new().with_lease(lease.id())),
            )]);
        let put = client.txn(put).await;
        match put {
            Ok(r) if r.succeeded() => {
                current.lease = lease.id();
                current.ttl_s = lease.ttl();
                current.unpublished = false;
                Ok(())
            }
            Ok(_) => {
                let _ = client.lease_revoke(lease.id()).await;
                current.ended = true;
                Err(MembershipError::DuplicateId(self.id.clone()))
            }
            Err(e) => {
                let _ = client.lease_revoke(lease.id()).await;
                Err(fail(e))
            }
        }
    }
}

fn is_lease_not_found(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("lease not found"),
        _ => false,
    }
}

/// Keeps the registration's lease alive, renewing it when etcd lost it, until aborted.
async fn keep_alive(shared: Arc<Shared>) {
    loop {
        let (lease, ttl_s) = {
            let current = shared.current.lock().await;
            if current.ended {
                return;
            }
            (current.lease, current.ttl_s)
        };
        let period = Shared::period(ttl_s);
        match hold(&shared, lease, period).await {
            Stopped::LeaseChanged => {}
            Stopped::LeaseGone => {
                let mut current = shared.current.lock().await;
                if current.lease != lease || current.ended {
                    continue;
                }
                tracing::warn!(
                    "worker {}: etcd lost its lease (etcd restarted, or unreachable for longer than {ttl_s} s); registering again",
                    shared.id
                );
                match shared.renew(&mut current).await {
                    Ok(()) => tracing::info!("worker {} registered again", shared.id),
                    Err(MembershipError::DuplicateId(id)) => {
                        tracing::error!(
                            "worker {id}: another worker registered this id while our lease was lost; this worker is no longer listed (restart it with another --id)"
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(
                            "worker {}: registering again failed: {e}; retrying",
                            shared.id
                        );
                        drop(current);
                        tokio::time::sleep(period).await;
                    }
                }
            }
            Stopped::Broken(e) => {
                tracing::warn!(
                    "worker {}: keep-alive of its lease at etcd {} failed: {e}; retrying",
                    shared.id,
                    shared.config.endpoints_text()
                );
                tokio::time::sleep(period).await;
            }
        }
    }
}

/// Keeps `lease` alive on one keep-alive stream, every `period`, until something stops it.
async fn hold(shared: &Shared, lease: i64, period: Duration) -> Stopped {
    let client = shared.client.clone();
    let (mut keeper, mut responses) = match client.lease_keep_alive(lease).await {
        Ok(pair) => pair,
        Err(e) if is_lease_not_found(&e) => return Stopped::LeaseGone,
        Err(e) => return Stopped::Broken(e),
    };
    loop {
        tokio::time::sleep(period).await;
        if shared.current.lock().await.lease != lease {
            return Stopped::LeaseChanged;
        }
        if let Err(e) = keeper.keep_alive().await {
            return Stopped::Broken(e);
        }
        match bounded(responses.message()).await {
            Ok(Some(response)) if response.ttl() > 0 => republish(shared, lease).await,
            Ok(Some(_)) => return Stopped::LeaseGone,
            Ok(None) => {
                return Stopped::Broken(etcd_client::Error::LeaseKeepAliveError(
                    "the keep-alive stream ended".into(),
                ))
            }
            Err(e) => return Stopped::Broken(e),
        }
    }
}

/// Puts the record again if its last update failed and the lease it was meant for is still
/// this one (a failed put is tried again at the next keep-alive).
async fn republish(shared: &Shared, lease: i64) {
    let mut current = shared.current.lock().await;
    if !current.unpublished || current.lease != lease || current.ended {
        return;
    }
    let client = shared.client.clone();
    let put = client
        .put(
            shared.key.clone(),
            encode(&current.worker),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await;
    match put {
        Ok(_) => {
            current.unpublished = false;
            tracing::info!(
                "worker {}: its record is up to date in etcd again",
                shared.id
            );
        }
        Err(e) => tracing::warn!(
            "worker {}: putting its record again failed: {e}; retrying",
            shared.id
        ),
    }
}

/// A worker's live record in etcd; its keep-alive task stops when this is dropped.
struct EtcdRegistration {
    shared: Arc<Shared>,
    keeper: JoinHandle<()>,
}

#[async_trait::async_trait]
impl Registration for EtcdRegistration {
    async fn update(&self, worker: Worker) -> Result<()> {
        let shared = &self.shared;
        let mut current = shared.current.lock().await;
        if current.ended {
            return Err(MembershipError::Ended(shared.id.clone()));
        }
        current.worker = Worker {
            id: shared.id.clone(),
            ..worker
        };
        let client = shared.client.clone();
        let put = client
            .put(
                shared.key.clone(),
                encode(&current.worker),
                Some(PutOptions::new().with_lease(current.lease)),
            )
            .await;
        match put {
            Ok(_) => {
                current.unpublished = false;
                Ok(())
            }
            // The keep-alive task has not noticed yet; renewing here puts the new record too.
            Err(e) if is_lease_not_found(&e) => {
                shared.renew(&mut current).await.inspect_err(|_| {
                    current.unpublished = true;
                })
            }
            Err(e) => {
                current.unpublished = true;
                Err(etcd_error(&shared.config, e))
            }
        }
    }

    async fn leave(self: Box<Self>) -> Result<()> {
        // Taking the lock first lets a renewal in progress finish, so no fresh lease outlives us.
        let mut current = self.shared.current.lock().await;
        current.ended = true;
        self.keeper.abort();
        let client = self.shared.client.clone();
        match client.lease_revoke(current.lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Ok(()),
            Err(e) => Err(etcd_error(&self.shared.config, e)),
        }
    }
}

impl Drop for EtcdRegistration {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}
