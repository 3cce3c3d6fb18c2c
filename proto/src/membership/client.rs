//! Reaching etcd with bounded waits: the one way the farm makes an etcd client from an
//! [`EtcdConfig`], used by the membership and by the coordinator's job store.
//!
//! etcd-client connects lazily, and its balanced channel waits without limit for an endpoint to
//! become ready, so a request to a dead endpoint would hang forever. [`connect`] therefore proves
//! that the endpoints answer before handing the client out, and every unary call goes through
//! [`bounded`]. Streams (watches, lease keep-alives) are not bounded: they live as long as needed.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use super::EtcdConfig;

/// How long opening a TCP connection to an endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one request (get, put, grant, ...) may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A client for `config.endpoints` that has answered a status request within
/// [`CONNECT_TIMEOUT`]; an unreachable cluster fails in about that time, never hangs.
pub async fn connect(config: &EtcdConfig) -> Result<Client, etcd_client::Error> {
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
    let mut client = Client::connect(&config.endpoints, Some(options)).await?;
    within(CONNECT_TIMEOUT, client.status()).await?;
    Ok(client)
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

/// Runs one etcd request, failing with a timed-out I/O error after [`REQUEST_TIMEOUT`].
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
