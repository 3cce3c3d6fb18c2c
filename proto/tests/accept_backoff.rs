//! At the descriptor limit the accept loop waits between failed accepts instead of spinning
//! (the coordinator once burned a core at 100% there). Its own test binary: it lowers this
//! process's open-file limit, which would break tests running beside it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use longtake_proto::serving::{incoming, ACCEPT_ERROR_BACKOFF};

fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_accepts_back_off_instead_of_spinning() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    // connections waiting in the backlog that the server cannot take: no descriptor is left
    let waiting: Vec<std::net::TcpStream> = (0..4)
        .map(|_| std::net::TcpStream::connect(address).unwrap())
        .collect();
    let server = incoming(listener);
    let errors = server.accept_errors.clone();
    let limit = libc::rlimit {
        rlim_cur: open_descriptors(),
        rlim_max: libc::RLIM_INFINITY,
    };
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on this process's own limits, with valid pointers.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
        assert_eq!(
            libc::setrlimit(
                libc::RLIMIT_NOFILE,
                &libc::rlimit {
                    rlim_max: old.rlim_max,
                    ..limit
                }
            ),
            0
        );
    }
    let window = Duration::from_secs(1);
    tokio::time::sleep(window).await;
    let failed = errors.load(Ordering::Relaxed);
    // SAFETY: as above.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &old), 0);
    }
    assert!(failed >= 1, "the accepts did fail at the limit");
    // a spinning loop fails thousands of times a second; with the back-off, about one accept
    // per ACCEPT_ERROR_BACKOFF (10 in the window), with room for a slow machine
    let most = 3 * (window.as_millis() / ACCEPT_ERROR_BACKOFF.as_millis()) as u64;
    assert!(
        failed <= most,
        "{failed} failed accepts in {window:?}: the accept loop spins"
    );
    // with descriptors again, the waiting connections are taken
    let mut connections = server.connections;
    for _ in 0..waiting.len() {
        let next = tokio::time::timeout(Duration::from_secs(30), async {
            tokio_stream::StreamExt::next(&mut connections).await
        })
        .await
        .expect("hang guard: the server never took a waiting connection");
        assert!(matches!(next, Some(Ok(_))));
    }
}
