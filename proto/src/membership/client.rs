//! Reaching etcd with bounded waits: the one way the farm makes an etcd client ([`Etcd`]) from
//! an [`EtcdConfig`], used by the membership and by the coordinator's job store and election.
//!
//! etcd-client connects lazily, and its balanced channel waits without limit for an endpoint to
//! become ready, so a request to a dead endpoint would hang forever. [`connect`] therefore proves
//! that the endpoints answer before handing the client out, and every unary call of [`Etcd`] is
//! bounded by [`REQUEST_TIMEOUT`]. The channel also keeps a dead member of a cluster among its
//! endpoints and sends it requests, which fail at once with a connection error (with one of
//! three members killed, about one request in three); such a request never reached etcd, so
//! [`Etcd`] sends it again, to whichever member the channel picks next, until the time is up.
//! Streams (watches, lease keep-alives) are opened the same way but not bounded: they live as
//! long as needed.

use std::future::Future;
use std::time::{Duration, Instant};

use etcd_client::{
    CampaignResponse, Client, ConnectOptions, DeleteOptions, DeleteResponse, GetOptions,
    GetResponse, LeaderResponse, LeaseGrantResponse, LeaseKeepAliveStream, LeaseKeeper,
    LeaseRevokeResponse, PutOptions, PutResponse, Txn, TxnResponse, WatchOptions, WatchStream,
};

use super::EtcdConfig;

/// How long opening a TCP connection to an endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one request (get, put, grant, ...) may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait before sending again a request that could not reach an endpoint.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// A client for `config.endpoints` that has answered a status request within
/// [`CONNECT_TIMEOUT`]; an unreachable cluster fails in about that time, never hangs.
pub async fn connect(config: &EtcdConfig) -> Result<Etcd, etcd_client::Error> {
    let options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        // HTTP/2 pings notice a silently dead connection (a partition) under a watch that would
        // otherwise wait on it forever. Not more often than etcd's --grpc-keepalive-min-time
        // (5 s), and not while idle: etcd answers either with GOAWAY (too many pings).
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(false);
    let options = match &config.tls {
        Some(tls) => options.with_tls(tls.clone()),
        None => options,
    };
    let client = Client::connect(&config.endpoints, Some(options)).await?;
    let etcd = Etcd { client };
    etcd.retried(CONNECT_TIMEOUT, |mut c| async move { c.status().await })
        .await?;
    Ok(etcd)
}

/// An etcd client whose every request is bounded in time and sent again while it cannot reach
/// an endpoint (see the module's doc). Cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
}

impl Etcd {
    pub async fn get(
        &self,
        key: impl Into<Vec<u8>>,
        options: Option<GetOptions>,
    ) -> Result<GetResponse, etcd_client::Error> {
        let key = key.into();
        self.request(|mut c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.get(key, options).await }
        })
        .await
    }

    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        options: Option<PutOptions>,
    ) -> Result<PutResponse, etcd_client::Error> {
        let (key, value) = (key.into(), value.into());
        self.request(|mut c| {
            let (key, value, options) = (key.clone(), value.clone(), options.clone());
            async move { c.put(key, value, options).await }
        })
        .await
    }

    pub async fn delete(
        &self,
        key: impl Into<Vec<u8>>,
        options: Option<DeleteOptions>,
    ) -> Result<DeleteResponse, etcd_client::Error> {
        let key = key.into();
        self.request(|mut c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.delete(key, options).await }
        })
        .await
    }

    /// A transaction. Sent again only when it could not reach etcd, so it ran at most once.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, etcd_client::Error> {
        self.request(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    pub async fn lease_grant(&self, ttl_s: i64) -> Result<LeaseGrantResponse, etcd_client::Error> {
        self.request(|mut c| async move { c.lease_grant(ttl_s, None).await })
            .await
    }

    pub async fn lease_revoke(
        &self,
        lease: i64,
    ) -> Result<LeaseRevokeResponse, etcd_client::Error> {
        self.request(|mut c| async move { c.lease_revoke(lease).await })
            .await
    }

    /// Opens the keep-alive stream of `lease` (the opening is bounded, the stream is not).
    pub async fn lease_keep_alive(
        &self,
        lease: i64,
    ) -> Result<(LeaseKeeper, LeaseKeepAliveStream), etcd_client::Error> {
        self.request(|mut c| async move { c.lease_keep_alive(lease).await })
            .await
    }

    /// Opens a watch (the opening is bounded, the stream is not).
    pub async fn watch(
        &self,
        key: impl Into<Vec<u8>>,
        options: Option<WatchOptions>,
    ) -> Result<WatchStream, etcd_client::Error> {
        let key = key.into();
        self.request(|mut c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.watch(key, options).await }
        })
        .await
    }

    /// Campaigns in the election `name` with `value` under `lease`: waits, without a bound,
    /// until this campaign leads (or fails).
    pub async fn campaign(
        &self,
        name: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<CampaignResponse, etcd_client::Error> {
        self.client.clone().campaign(name, value, lease).await
    }

    /// The current leader of the election `name` (an error when there is none).
    pub async fn leader(
        &self,
        name: impl Into<Vec<u8>>,
    ) -> Result<LeaderResponse, etcd_client::Error> {
        let name = name.into();
        self.request(|mut c| {
            let name = name.clone();
            async move { c.leader(name).await }
        })
        .await
    }

    async fn request<T, F, Fut>(&self, call: F) -> Result<T, etcd_client::Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.retried(REQUEST_TIMEOUT, call).await
    }

    /// Sends `call` until it reaches etcd (see [`never_reached_etcd`]) or `limit` has passed.
    async fn retried<T, F, Fut>(
        &self,
        limit: Duration,
        mut call: F,
    ) -> Result<T, etcd_client::Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match within(left, call(self.client.clone())).await {
                Err(error)
                    if never_reached_etcd(&error) && Instant::now() + RETRY_PAUSE < deadline =>
                {
                    tracing::debug!("etcd request could not reach an endpoint ({error}); again");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                result => return result,
            }
        }
    }
}

/// Whether `error` says the request failed before it reached an etcd member: no connection
/// could be made to the endpoint the channel picked.
fn never_reached_etcd(error: &etcd_client::Error) -> bool {
    let connecting = |text: &str| {
        let text = text.to_ascii_lowercase();
        ["tcp connect", "trying to connect", "connection refused"]
            .iter()
            .any(|sign| text.contains(sign))
    };
    match error {
        etcd_client::Error::TransportError(e) => connecting(&format!("{e} {e:?}")),
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable
                && connecting(&format!("{} {:?}", status.message(), status))
        }
        _ => false,
    }
}

/// What to do about an etcd error at `endpoints`: a TLS refusal asks for the farm's etcd
/// certificates; otherwise a running etcd at the given URL (and, for an https:// one, the
/// certificates too: a refused client certificate can also look like a closed connection).
pub fn hint(endpoints: &str, error: &etcd_client::Error) -> &'static str {
    let text = format!("{error} {error:?}").to_ascii_lowercase();
    if text.contains("certificate") || text.contains("tls") || text.contains("handshake") {
        "etcd refused this client's TLS: pass --etcd-ca with the CA of etcd's certificate, and \
         --etcd-cert/--etcd-key with a client certificate of the CA etcd trusts"
    } else if endpoints.contains("https://") {
        "is etcd running there, and does it take this client's certificate? check --etcd-ca, \
         and --etcd-cert/--etcd-key for an etcd with --client-cert-auth"
    } else {
        "is etcd running there? start it or pass --etcd with its client URL"
    }
}

/// Waits for one step of a stream (a watch's or keep-alive's next message), failing with a
/// timed-out I/O error after [`REQUEST_TIMEOUT`].
pub async fn bounded<T>(
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    within(REQUEST_TIMEOUT, request).await
}

async fn within<T>(
    limit: Duration,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    match tokio::time::timeout(limit, request).await {
        Ok(result) => result,
        Err(_) => Err(etcd_client::Error::IoError(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} s", limit.as_secs()),
        ))),
    }
}

impl EtcdConfig {
    /// The endpoints as one comma-separated string, as error messages name them.
    pub fn endpoints_text(&self) -> String {
        self.endpoints.join(",")
    }

    /// The key prefix of one kind of record, e.g. `/longtake/workers/` for `"workers"`; a
    /// trailing slash on [`EtcdConfig::prefix`] is ignored.
    pub fn keys_of(&self, kind: &str) -> String {
        format!("{}/{kind}/", self.prefix.trim_end_matches('/'))
    }
}
