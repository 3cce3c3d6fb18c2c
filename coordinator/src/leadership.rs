//! Which of several coordinators on one etcd schedules: etcd's election API (the election
//! `<prefix>/coordinator/leader`), campaigned on under a lease this module keeps alive.
//!
//! The leader alone starts the scheduler. Every job-record write it makes is fenced: the store
//! writes in a transaction that compares the leader key's create revision ([`Fence`]), so a
//! coordinator that lost the leadership (its lease expired while it was cut off from etcd and a
//! standby took over) writes nothing more. Losing the leadership to another coordinator ends a
//! coordinator's term: [`Leadership::lost`] resolves, and `serve coordinator` stops and exits,
//! to be started again (by its supervisor) as a standby. A coordinator that stops on a signal
//! gives the leadership up at once ([`Leadership::resign`]), so a standby takes over without
//! waiting for the lease.
//!
//! An etcd outage is not a loss: while etcd does not answer, nobody else can be elected either,
//! and the leader keeps its running jobs (their records are written once etcd answers). If its
//! lease expired meanwhile, it campaigns again at once; it goes on leading, with a new fence, if
//! no other coordinator was elected, and exits otherwise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use longtake_proto::membership::client::{bounded, connect, Etcd};
use longtake_proto::membership::EtcdConfig;
use tokio::sync::{watch, Notify};
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

/// One term of leadership: the leader key etcd made for the campaign, its create revision,
/// and the lease that holds it.
#[derive(Debug, Clone, Default)]
struct Term {
    key: Vec<u8>,
    revision: i64,
    lease: i64,
}

/// What the leader and its keep-alive task share.
struct Shared {
    etcd: Etcd,
    name: String,
    address: String,
    ttl: Duration,
    term: RwLock<Term>,
    leading: AtomicBool,
    /// A fenced write was refused: look at the term now.
    check: Notify,
    lost: watch::Sender<Option<String>>,
}

impl Shared {
    fn term(&self) -> Term {
        self.term.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_term(&self, term: Term) {
        *self.term.write().unwrap_or_else(|p| p.into_inner()) = term;
    }

    /// Records the first reason the leadership was lost (later ones add nothing).
    fn lose(&self, why: String) {
        self.lost.send_if_modified(|lost| {
            if lost.is_none() {
                *lost = Some(why);
                true
            } else {
                false
            }
        });
    }
}

/// The proof of leadership a job store checks each write against.
#[derive(Clone)]
pub struct Fence {
    shared: Arc<Shared>,
}

impl Fence {
    /// A transaction doing `operation` only while this leadership's current term holds.
    pub fn guard(&self, operation: TxnOp) -> Txn {
        let term = self.shared.term();
        Txn::new()
            .when([Compare::create_revision(
                term.key,
                CompareOp::Equal,
                term.revision,
            )])
            .and_then([operation])
    }

    /// A fenced write was refused: the term ended (its lease expired in an etcd outage, or
    /// another coordinator leads). The keep-alive task looks at once and leads again or gives up.
    pub fn refused(&self) {
        self.shared.check.notify_one();
    }
}

/// This coordinator's leadership, from winning the election until it resigns or loses it.
pub struct Leadership {
    shared: Arc<Shared>,
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
        let ttl = Duration::from_secs(ttl.as_secs().max(1));
        let lease = etcd
            .lease_grant(ttl.as_secs() as i64)
            .await
            .map_err(fail)?
            .id();
        let (lost_tx, lost) = watch::channel(None);
        let shared = Arc::new(Shared {
            etcd: etcd.clone(),
            name: election_name(config),
            address: address.to_string(),
            ttl,
            term: RwLock::new(Term {
                lease,
                ..Term::default()
            }),
            leading: AtomicBool::new(false),
            check: Notify::new(),
            lost: lost_tx,
        });
        let keeper = tokio::spawn(keep_alive(shared.clone()));
        if let Ok(current) = etcd.leader(shared.name.clone()).await {
            let address = current
                .kv()
                .and_then(|kv| String::from_utf8(kv.value().to_vec()).ok());
            on_standby(address);
        }
        let won = loop {
            tokio::select! {
                won = etcd.campaign(shared.name.clone(), address, lease) => match won {
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
        let Some(leader) = won.leader() else {
            keeper.abort();
            return Err(LeadershipError::Lost("etcd named no leader key".into()));
        };
        shared.set_term(Term {
            key: leader.key().to_vec(),
            revision: leader.rev(),
            lease,
        });
        shared.leading.store(true, Ordering::SeqCst);
        Ok(Self {
            shared,
            lost,
            keeper,
        })
    }

    /// What this leadership's job-record writes are checked against.
    pub fn fence(&self) -> Fence {
        Fence {
            shared: self.shared.clone(),
        }
    }

    /// Resolves with the reason once another coordinator leads (or this one's candidacy
    /// ended).
    pub fn lost(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        reason(&self.lost)
    }

    /// Gives the leadership up now: revoking the lease deletes the leader key, and the next
    /// standby in line leads at once.
    pub async fn resign(self) {
        self.keeper.abort();
        let lease = self.shared.term().lease;
        if let Err(e) = self.shared.etcd.lease_revoke(lease).await {
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

/// What one renewal of the lease found.
enum Renewal {
    Alive,
    /// etcd answered that the lease is gone (expired, or revoked).
    Gone,
    /// etcd did not answer.
    Unreachable(String),
}

type KeepAlive = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

async fn renew(shared: &Shared, lease: i64, stream: &mut Option<KeepAlive>) -> Renewal {
    let gone = |e: &etcd_client::Error| format!("{e:?}").contains("lease not found");
    if stream.is_none() {
        match shared.etcd.lease_keep_alive(lease).await {
            Ok(pair) => *stream = Some(pair),
            Err(e) if gone(&e) => return Renewal::Gone,
            Err(e) => return Renewal::Unreachable(e.to_string()),
        }
    }
    let Some((keeper, responses)) = stream.as_mut() else {
        return Renewal::Unreachable("no keep-alive stream".into());
    };
    let answer = match keeper.keep_alive().await {
        Ok(()) => bounded(responses.message()).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(Some(response)) if response.ttl() > 0 => Renewal::Alive,
        Ok(Some(_)) => Renewal::Gone,
        Ok(None) => {
            *stream = None;
            Renewal::Unreachable("the keep-alive stream ended".into())
        }
        Err(e) if gone(&e) => Renewal::Gone,
        Err(e) => {
            *stream = None;
            Renewal::Unreachable(e.to_string())
        }
    }
}

/// Keeps the lease alive a third of its TTL apart (at once after a refused write), and
/// handles the end of a term: see the module's doc.
async fn keep_alive(shared: Arc<Shared>) {
    let period = shared.ttl / 3;
    let mut stream = None;
    let mut unanswered_since: Option<Instant> = None;
    let mut warned = false;
    loop {
        let checked = tokio::select! {
            _ = tokio::time::sleep(period) => false,
            _ = shared.check.notified() => true,
        };
        let term = shared.term();
        let leading = shared.leading.load(Ordering::SeqCst);
        let ended = match renew(&shared, term.lease, &mut stream).await {
            Renewal::Alive => {
                if warned {
                    tracing::info!("coordinator election: etcd answers again; still leading");
                }
                unanswered_since = None;
                warned = false;
                // a refused write with the lease alive: is the key still this term's?
                checked && leading && !holds_key(&shared, &term).await
            }
            Renewal::Gone => true,
            Renewal::Unreachable(why) => {
                let since = *unanswered_since.get_or_insert_with(Instant::now);
                if !warned && since.elapsed() >= shared.ttl {
                    warned = true;
                    tracing::warn!(
                        "coordinator election: etcd has not answered for {:.0} s ({why}); the \
                         running jobs go on, their records are written once it answers",
                        since.elapsed().as_secs_f64()
                    );
                }
                false
            }
        };
        if !ended {
            continue;
        }
        stream = None;
        if !leading {
            shared.lose("its candidacy's lease expired".into());
            return;
        }
        match lead_again(&shared).await {
            Ok(term) => {
                tracing::warn!(
                    "coordinator election: its lease had expired (etcd unreachable); no other \
                     coordinator was elected, so it leads again"
                );
                shared.set_term(term);
            }
            Err(why) => {
                shared.lose(why);
                return;
            }
        }
    }
}

/// Whether this term's leader key is still there, made by this term.
async fn holds_key(shared: &Shared, term: &Term) -> bool {
    match shared.etcd.get(term.key.clone(), None).await {
        Ok(found) => found
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == term.revision),
        // no answer: no evidence either way; the next refused write asks again
        Err(_) => true,
    }
}

/// After this leader's term ended without a successor: campaigns again with a new lease and
/// returns the new term, or why it cannot lead (another coordinator does).
async fn lead_again(shared: &Shared) -> Result<Term, String> {
    if let Ok(current) = shared.etcd.leader(shared.name.clone()).await {
        if let Some(kv) = current.kv() {
            return Err(format!(
                "another coordinator leads now ({})",
                String::from_utf8_lossy(kv.value())
            ));
        }
    }
    let lease = shared
        .etcd
        .lease_grant(shared.ttl.as_secs() as i64)
        .await
        .map_err(|e| format!("its lease expired and a new one could not be had: {e}"))?
        .id();
    let campaign = shared
        .etcd
        .campaign(shared.name.clone(), shared.address.clone(), lease);
    // A campaign that does not win at once waits behind another candidate: a standby leads.
    let won = match tokio::time::timeout(shared.ttl, campaign).await {
        Ok(Ok(won)) => won,
        Ok(Err(e)) => {
            let _ = shared.etcd.lease_revoke(lease).await;
            return Err(format!(
                "its lease expired and campaigning again failed: {e}"
            ));
        }
        Err(_) => {
            let _ = shared.etcd.lease_revoke(lease).await;
            return Err("its lease expired and another coordinator was first in line".into());
        }
    };
    let leader = won
        .leader()
        .ok_or_else(|| "etcd named no leader key".to_string())?;
    Ok(Term {
        key: leader.key().to_vec(),
        revision: leader.rev(),
        lease,
    })
}
