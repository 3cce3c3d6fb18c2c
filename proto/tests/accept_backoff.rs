//! At the descriptor limit the accept loop waits between failed accepts instead of spinning
//! (the coordinator once burned a core at 100% there). Its own test binary: it lowers this
//! process's open-file limit, which would break tests running beside it.

use std::sync::atomic::Ordering;

use longtake_proto::serving::{incoming, ACCEPT_ERROR_BACKOFF};

fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

/// Tokio's clock is paused: the accept task's back-off only ends when the test moves the clock,
/// so the test counts failed accepts between two moves without reading any clock.
#[tokio::test(start_paused = true)]
async fn failed_accepts_back_off_instead_of_spinning() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    // connections waiting in the backlog that the server cannot take: no descriptor is left
    // (each says something, as a client does: a silent one is never handed to the server)
    let waiting: Vec<std::net::TcpStream> = (0..4)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(address).unwrap();
            std::io::Write::write_all(&mut stream, b"P").unwrap();
            stream
        })
        .collect();
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on this process's own limits, with valid pointers.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
        let at_the_limit = libc::rlimit {
            rlim_cur: open_descriptors(),
            rlim_max: old.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &at_the_limit), 0);
    }
    let server = incoming(listener);
    let errors = server.accept_errors.clone();
    let failed = || errors.load(Ordering::Relaxed);
    let mut yields = 0;
    while failed() == 0 {
        tokio::task::yield_now().await;
        yields += 1;
        assert!(
            yields < 100_000,
            "hang guard: the first accept never failed"
        );
    }
    // the accept task has every chance to run, but no time passes: it must not try again
    for _ in 0..1_000 {
        tokio::task::yield_now().await;
    }
    let before = failed();
    tokio::time::advance(ACCEPT_ERROR_BACKOFF).await;
    for _ in 0..1_000 {
        tokio::task::yield_now().await;
    }
    let after = failed();
    // SAFETY: as above.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &old), 0);
    }
    assert_eq!(
        before, 1,
        "it retried {before} times with no time passing: it spins"
    );
    assert_eq!(after, 2, "one more try after the back-off");
    // with descriptors again, the waiting connections are taken
    tokio::time::advance(ACCEPT_ERROR_BACKOFF).await;
    let mut connections = server.connections;
    for _ in 0..waiting.len() {
        let next = tokio_stream::StreamExt::next(&mut connections).await;
        assert!(matches!(next, Some(Ok(_))), "{next:?}");
    }
}
