//! Connections to a longtake gRPC server that do nothing are closed: one that never speaks
//! after the first-bytes time-out, one that opened HTTP/2 and then idles at the connection age.
//! Before, both were kept forever, and enough of them took every file descriptor.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use longtake_proto::serving::{incoming_with, server_with_age};

/// Hang guard: far beyond the time-outs set here; it turns a connection never closed into a
/// failure.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// A server of no service whose silent connections go after 300 ms and whose connections are
/// asked to go at 500 ms; returns its address.
async fn server() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let served = incoming_with(listener, Duration::from_millis(300));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        server_with_age(Duration::from_millis(500))
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming_shutdown(served.connections, async {
                let _ = stopped.await;
            }),
    );
    (address, stop)
}

/// Connects, sends `hello`, then reads until the server closes the connection. With `http2`
/// it answers as an idle HTTP/2 client does: it acknowledges the server's SETTINGS and PINGs
/// (the server's graceful GOAWAY waits for a PING's answer) and sends nothing else.
fn closed_after(
    address: SocketAddr,
    hello: &'static [u8],
    http2: bool,
) -> Result<Duration, String> {
    let mut connection = std::net::TcpStream::connect(address).unwrap();
    connection.set_read_timeout(Some(HANG_GUARD)).unwrap();
    connection.write_all(hello).unwrap();
    let start = Instant::now();
    let still_open = |e: std::io::Error| format!("still open after {:?}: {e}", start.elapsed());
    let mut header = [0u8; 9];
    loop {
        if !http2 {
            return match connection.read(&mut header) {
                Ok(0) => Ok(start.elapsed()),
                Ok(_) => Err("a server spoke to a silent connection".into()),
                Err(e) => Err(still_open(e)),
            };
        }
        match connection.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(start.elapsed()),
            Err(e) => return Err(still_open(e)),
        }
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let (kind, flags) = (header[3], header[4]);
        let mut payload = vec![0u8; length];
        if let Err(e) = connection.read_exact(&mut payload) {
            return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(start.elapsed())
            } else {
                Err(still_open(e))
            };
        }
        let ack = match (kind, flags & 1) {
            (4, 0) => vec![0, 0, 0, 4, 1, 0, 0, 0, 0], // SETTINGS → SETTINGS ACK
            (6, 0) => [&[0, 0, 8, 6, 1, 0, 0, 0, 0][..], &payload].concat(), // PING → PING ACK
            _ => continue,
        };
        if connection.write_all(&ack).is_err() {
            return Ok(start.elapsed());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let (address, stop) = server().await;
    // the HTTP/2 client preface and an empty SETTINGS frame, then nothing
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let (silent, idle) = tokio::task::spawn_blocking(move || {
        (
            closed_after(address, b"", false),
            closed_after(address, PREFACE, true),
        )
    })
    .await
    .unwrap();
    let silent = silent.expect("a silent connection was kept");
    let idle = idle.expect("an idle HTTP/2 connection was kept");
    assert!(
        silent < HANG_GUARD && idle < HANG_GUARD,
        "{silent:?} {idle:?}"
    );
    let _ = stop.send(());
}
