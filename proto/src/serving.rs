//! What both gRPC servers (the coordinator's and each worker's) share: how their connections
//! are accepted, and the limits every connection gets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;

/// How long the accept loop waits after a failed accept (out of file descriptors, most often)
/// before it tries again; without the wait it retried at once, and at the descriptor limit the
/// coordinator spun at 100% CPU.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Accepted connections of a server, and how many accepts failed.
pub struct Incoming {
    pub connections: ReceiverStream<std::io::Result<TcpStream>>,
    /// Failed accepts so far (each followed by [`ACCEPT_ERROR_BACKOFF`]).
    pub accept_errors: Arc<AtomicU64>,
}

/// How long an accepted connection may stay silent before it is closed unserved: a gRPC client
/// speaks first (the HTTP/2 preface, or a TLS ClientHello), at once.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// The connections `listener` accepts, with TCP_NODELAY (small replies otherwise wait out the
/// peer's delayed ACK under Nagle, ~40 ms each on Linux; tonic sets it only on sockets it
/// accepts itself); a failed accept is logged and the next one waits [`ACCEPT_ERROR_BACKOFF`];
/// a connection that sends nothing within [`FIRST_BYTES_TIMEOUT`] is closed (the server never
/// sees it, and it holds no descriptor for longer). The accepting task ends when the server
/// drops the stream.
pub fn incoming(listener: TcpListener) -> Incoming {
    incoming_with(listener, FIRST_BYTES_TIMEOUT)
}

/// [`incoming`] with another first-bytes time-out (tests).
pub fn incoming_with(listener: TcpListener, first_bytes_timeout: Duration) -> Incoming {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let accept_errors = Arc::new(AtomicU64::new(0));
    let errors = accept_errors.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut first = [0u8; 1];
                        match tokio::time::timeout(first_bytes_timeout, stream.peek(&mut first))
                            .await
                        {
                            Ok(Ok(1..)) => {
                                let _ = tx.send(Ok(stream)).await;
                            }
                            _ => tracing::debug!(
                                %peer,
                                "closed a connection that sent nothing in {first_bytes_timeout:?}"
                            ),
                        }
                    });
                }
                Err(e) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "accepting a connection: {e}; trying again in {ACCEPT_ERROR_BACKOFF:?}"
                    );
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                    }
                }
            }
        }
    });
    Incoming {
        connections: ReceiverStream::new(rx),
        accept_errors,
    }
}

/// A gRPC server with the limits every longtake server keeps: dead peers' connections are found
/// by HTTP/2 and TCP keep-alives and closed; a connection idle but alive is closed once it is
/// [`MAX_CONNECTION_AGE`] old; one connection may run at most
/// [`CONCURRENT_REQUESTS_PER_CONNECTION`] requests at once.
pub fn server() -> tonic::transport::Server {
    server_with_age(MAX_CONNECTION_AGE)
}

/// [`server`], speaking TLS when given its configuration (a daemon started with certificates).
pub fn server_with_tls(
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<tonic::transport::Server, tonic::transport::Error> {
    match tls {
        Some(tls) => server().tls_config(tls),
        None => Ok(server()),
    }
}

/// [`server`] with another connection age (tests).
pub fn server_with_age(max_connection_age: Duration) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(CONCURRENT_REQUESTS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .max_connection_age(max_connection_age)
}

/// How old a connection may grow before the server asks it to go (HTTP/2 GOAWAY): requests in
/// flight finish (a watch or a task of hours is not cut: no grace limit is set), new ones go to
/// a new connection (tonic's clients reconnect by themselves), and a connection that is idle
/// but alive, or never spoke HTTP/2 at all, is closed. Before, such connections were kept
/// forever, and enough of them took every file descriptor.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(600);

/// Requests one connection may run at once (watches included).
pub const CONCURRENT_REQUESTS_PER_CONNECTION: usize = 256;
