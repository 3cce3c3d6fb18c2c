//! Which of several coordinators on one etcd schedules: etcd's election API (the election
//! `<prefix>/coordinator/leader`), campaigned on under a lease this module keeps alive.
//!
//! The leader alone starts the scheduler. Every job-record write it makes is fenced: the store
//! writes in a transaction that compares the leader key's create revision ([`Fence`]), so a
//! coordinator that lost the leadership (its lease expired while it was cut off from etcd and a
//! standby took over) writes nothing more. Losing the leadership ends a coordinator's term:
//! [`Leadership::lost`] resolves, and `serve coordinator` stops and exits, to be started again
//! (by its supervisor) as a standby. A coordinator that stops on a signal gives the leadership
//! up at once ([`Leadership::resign`]), so a standby takes over without waiting for the lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, LeaderKey, Txn, TxnOp};
use longtake_proto::membership::client::{bounded, connect, Etcd};
use longtake_proto::membership::EtcdConfig;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why a coordinator could not lead.
#[derive(Debug, thiserror::Error)]
pub enum LeadershipError {
    #[error(
        "coordinator election in etcd at {endpoints}: {source} ({})",
        longtake_proto::membership::etcd_hint(endpoints, source)
    )]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("coordinator election: {0}")]
    Lost(String),
}

/// The proof of leadership a job store checks each write against, and the flag it raises when
/// a write finds the leadership gone.
#[derive(Clone)]
pub struct Fence {
    key: Vec<u8>,
    revision: i64,
    lost: Arc<watch::Sender<Option<String>>>,
}

impl Fence {
    /// A transaction doing `operation` only while this leadership holds.
    pub fn guard(&self, operation: TxnOp) -> Txn {
        Txn::new()
            .when([Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                self.revision,
            )])
            .and_then([operation])
    }

    /// Records that a fenced write was refused: another coordinator leads.
    pub fn refused(&self) {
        self.lose("a job-record write found that this coordinator no longer leads".into());
    }

    fn lose(&self, why: String) {
        lose(&self.lost, why);
    }
}

/// Records the first reason the leadership was lost (later ones add nothing).
fn lose(lost: &watch::Sender<Option<String>>, why: String) {
    lost.send_if_modified(|lost| {
        if lost.is_none() {
            *lost = Some(why);
            true
        } else {
            false
        }
    });
}

/// This coordinator's leadership, from winning the election until it resigns or loses it.
pub struct Leadership {
    etcd: Etcd,
    lease: i64,
    fence: Fence,
    lost: watch::Receiver<Option<String>>,
    keeper: JoinHandle<()>,
}

impl Leadership {
    /// Campaigns in the election of `config.prefix` with `address` (what standbys and
    /// operators are told about the leader) under a lease of `ttl`; returns once this
    /// coordinator leads. `on_standby` is called once if another leads first, with the address
    /// that one announced.
    pub async fn campaign(
        config: &EtcdConfig,
        address: &str,
        ttl: Duration,
        on_standby: impl FnOnce(Option<String>),
    ) -> Result<Self, LeadershipError> {
        let endpoints = config.endpoints_text();
        let fail = |source| LeadershipError::Etcd {
            endpoints: endpoints.clone(),
            source,
        };
        let etcd = connect(config).await.map_err(fail)?;
        let name = election_name(config);
        let ttl_s = ttl.as_secs().max(1) as i64;
        let lease = etcd.lease_grant(ttl_s).await.map_err(fail)?.id();
        let (lost_tx, lost) = watch::channel(None);
        let lost_tx = Arc::new(lost_tx);
        let keeper = tokio::spawn(keep_alive(
            etcd.clone(),
            lease,
            Duration::from_secs(ttl_s as u64),
            lost_tx.clone(),
        ));
        if let Ok(current) = etcd.leader(name.clone()).await {
            let address = current
                .kv()
                .and_then(|kv| String::from_utf8(kv.value().to_vec()).ok());
            on_standby(address);
        }
        let won = loop {
            tokio::select! {
                won = etcd.campaign(name.clone(), address, lease) => match won {
                    Ok(won) => break won,
                    // a broken connection ends the campaign call, not the candidacy: the lease
                    // holds it; campaigning again with the same lease takes up the same key
                    Err(e) if lost.borrow().is_none() => {
                        tracing::warn!("coordinator election: {e}; campaigning again");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => {
                        keeper.abort();
                        return Err(fail(e));
                    }
                },
                why = reason(&lost) => {
                    keeper.abort();
                    return Err(LeadershipError::Lost(why));
                }
            }
        };
        let leader: LeaderKey = won
            .leader()
            .cloned()
            .ok_or_else(|| LeadershipError::Lost("etcd named no leader key".into()))?;
        let fence = Fence {
            key: leader.key().to_vec(),
            revision: leader.rev(),
            lost: lost_tx,
        };
        Ok(Self {
            etcd,
            lease,
            fence,
            lost,
            keeper,
        })
    }

    /// What this leadership's job-record writes are checked against.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// Resolves with the reason once this coordinator no longer leads (its lease could not be
    /// renewed in time, or a fenced write was refused).
    pub fn lost(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        reason(&self.lost)
    }

    /// Gives the leadership up now: revoking the lease deletes the leader key, and the next
    /// standby in line leads at once.
    pub async fn resign(self) {
        self.keeper.abort();
        if let Err(e) = self.etcd.lease_revoke(self.lease).await {
            tracing::warn!(
                "coordinator election: giving up the leadership failed ({e}); a standby takes \
                 over when the lease expires"
            );
        }
    }
}

/// Resolves with the reason once the leadership (or the candidacy) is lost.
fn reason(
    lost: &watch::Receiver<Option<String>>,
) -> impl std::future::Future<Output = String> + Send + 'static {
    let mut lost = lost.clone();
    async move {
        let _ = lost.wait_for(Option::is_some).await;
        let why = lost.borrow().clone();
        why.unwrap_or_else(|| "the leadership ended".into())
    }
}

fn election_name(config: &EtcdConfig) -> String {
    format!("{}/coordinator/leader", config.prefix.trim_end_matches('/'))
}

/// Keeps the lease alive a third of its TTL apart. Declares the leadership lost when etcd says
/// the lease is gone, or when no renewal has succeeded for the TTL less one period: before
/// etcd can expire the lease and let a standby lead, so two coordinators never both believe
/// they lead.
async fn keep_alive(
    etcd: Etcd,
    lease: i64,
    ttl: Duration,
    lost: Arc<watch::Sender<Option<String>>>,
) {
    let period = ttl / 3;
    let mut renewed = Instant::now();
    let mut stream = None;
    loop {
        tokio::time::sleep(period).await;
        if stream.is_none() {
            match etcd.lease_keep_alive(lease).await {
                Ok(pair) => stream = Some(pair),
                Err(e) => tracing::warn!("coordinator election: renewing the lease: {e}"),
            }
        }
        if let Some((keeper, responses)) = stream.as_mut() {
            let renewal = match keeper.keep_alive().await {
                Ok(()) => bounded(responses.message()).await,
                Err(e) => Err(e),
            };
            match renewal {
                Ok(Some(response)) if response.ttl() > 0 => renewed = Instant::now(),
                Ok(Some(_)) => {
                    lose(&lost, "its lease expired at etcd".into());
                    return;
                }
                Ok(None) => stream = None,
                Err(e) => {
                    tracing::warn!("coordinator election: renewing the lease: {e}");
                    stream = None;
                }
            }
        }
        if renewed.elapsed() + period >= ttl {
            lose(
                &lost,
                format!(
                    "its lease could not be renewed for {:.1} s (TTL {} s)",
                    renewed.elapsed().as_secs_f64(),
                    ttl.as_secs()
                ),
            );
            return;
        }
    }
}
