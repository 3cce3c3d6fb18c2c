//! The TCP mesh against the definitions of its collectives, with ranks as threads of this test
//! process over loopback sockets (listeners pre-bound to port 0, so no port races), and with
//! ranks as separate OS processes (this test binary re-run as a child).

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use longtake_worker::parallel::{
    CommError, Communicator, MeshSecret, Op, TcpMesh, TcpMeshConfig, Timeouts,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn quick_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(10),
        op: Duration::from_secs(10),
        retry_interval: Duration::from_millis(10),
    }
}

/// Hang guard: far beyond every deadline these tests set, it only turns a hang into a failure.
/// No test here asserts on how long something took.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Runs `f` on its own thread; fails the test if it has not returned within [`HANG_GUARD`].
fn hang_guard<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(HANG_GUARD) {
        Ok(r) => r,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("hang guard ({HANG_GUARD:?}): {what} never returned")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the thread ended without sending"),
        },
    }
}

fn bind_listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    let addrs = listeners
        .iter()
        .map(|l| l.local_addr().expect("bound address"))
        .collect();
    (listeners, addrs)
}

/// Runs `body(rank, mesh)` on `n` ranks, one thread each, and returns the ranks' results in
/// rank order.
fn with_mesh<R: Send>(
    n: usize,
    timeouts: Timeouts,
    body: impl Fn(usize, TcpMesh) -> R + Sync,
) -> Vec<R> {
    let (listeners, addrs) = bind_listeners(n);
    let secret = MeshSecret::random();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let config = TcpMeshConfig {
                    rank,
                    peers: addrs.clone(),
                    timeouts: timeouts.clone(),
                    secret: secret.clone(),
                };
                let body = &body;
                s.spawn(move || {
                    let mesh = TcpMesh::connect_with_listener(config, listener)
                        .unwrap_or_else(|e| panic!("mesh setup: {e}"));
                    body(rank, mesh)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

/// Rank `r`'s input: distinct per rank and element, not exactly representable sums.
fn input(r: usize, shape: (usize, usize), dtype: DType) -> Tensor {
    let n = shape.0 * shape.1;
    let v: Vec<f32> = (0..n)
        .map(|i| ((r * 131 + i * 7) as f32 * 0.37).sin() * 10f32.powi((i % 5) as i32 - 2))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("test tensor")
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("tensor values")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_eq!(bits(got), bits(want), "{what}: values");
}

/// The definition of the reduction: the ranks' tensors added in rank order, half precision
/// accumulated in f32.
fn reference_sum(n: usize, shape: (usize, usize), dtype: DType) -> Tensor {
    let acc_dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mut acc = input(0, shape, dtype).to_dtype(acc_dtype).unwrap();
    for r in 1..n {
        acc = (acc + input(r, shape, dtype).to_dtype(acc_dtype).unwrap()).unwrap();
    }
    acc.to_dtype(dtype).unwrap()
}

fn check_collectives(n: usize, dtype: DType) {
    let shape = (3, 4);
    let results = with_mesh(n, quick_timeouts(), |rank, comm| -> Result<(), CommError> {
        assert_eq!((comm.rank(), comm.world_size()), (rank, n));
        let mine = input(rank, shape, dtype);

        let sum = comm.all_reduce_sum(&mine)?;
        assert_same(&sum, &reference_sum(n, shape, dtype), "all_reduce_sum");

        for dim in 0..2 {
            let gathered = comm.all_gather(&mine, dim)?;
            let parts: Vec<Tensor> = (0..n).map(|r| input(r, shape, dtype)).collect();
            assert_same(&gathered, &Tensor::cat(&parts, dim).unwrap(), "all_gather");
        }

        // Input i goes to rank i; output j came from rank j. Sizes differ per pair.
        let piece = |from: usize, to: usize| input(from * 10 + to, (from + 1, to + 2), dtype);
        let outputs = comm.all_to_all((0..n).map(|to| piece(rank, to)).collect())?;
        assert_eq!(outputs.len(), n);
        for (from, out) in outputs.iter().enumerate() {
            assert_same(out, &piece(from, rank), "all_to_all");
        }

        // A ring of point-to-point messages: send never waits for the receiver.
        comm.send(&mine, (rank + 1) % n)?;
        let got = comm.recv((rank + n - 1) % n, &Device::Cpu)?;
        assert_same(&got, &input((rank + n - 1) % n, shape, dtype), "send/recv");

        let root = n - 1;
        let sent = (rank == root).then(|| input(99, (2, 5), dtype));
        let b = comm.broadcast(sent.as_ref(), root, &Device::Cpu)?;
        assert_same(&b, &input(99, (2, 5), dtype), "broadcast");

        comm.barrier()?;
        assert!(comm.bytes_sent() > 0);
        assert_eq!(comm.bytes_sent(), comm.total_bytes_sent());
        Ok(())
    });
    for (rank, r) in results.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("world {n}, rank {rank}: {e}"));
    }
}

#[test]
fn collectives_match_their_definitions_f32() {
    for n in [2, 3, 4] {
        check_collectives(n, DType::F32);
    }
}

#[test]
fn collectives_match_their_definitions_half_precision() {
    check_collectives(3, DType::BF16);
    check_collectives(2, DType::F16);
}

#[test]
fn all_reduce_is_bit_identical_across_ranks_and_runs() {
    let shape = (64, 33);
    let run = || {
        with_mesh(4, quick_timeouts(), |rank, comm| {
            // Magnitudes that make the result depend on the order of additions.
            let scale = [1e8f64, 1.0, -1e8, 3.5][rank];
            let t = (input(rank, shape, DType::F32) * scale).unwrap();
            (0..3)
                .map(|_| bits(&comm.all_reduce_sum(&t).expect("all_reduce_sum")))
                .collect::<Vec<_>>()
        })
    };
    let first = run();
    let second = run();
    let reference = &first[0][0];
    for per_rank in first.iter().chain(&second) {
        for result in per_rank {
            assert!(result == reference, "results differ between ranks or runs");
        }
    }
}

#[test]
fn subgroups_run_concurrently_without_mixing() {
    let shape = (2, 3);
    let results = with_mesh(4, quick_timeouts(), |rank, comm| -> Result<(), CommError> {
        let members: Vec<usize> = if rank % 2 == 0 {
            vec![0, 2]
        } else {
            vec![1, 3]
        };
        let group = comm.subgroup(&members)?;
        assert_eq!((group.rank(), group.world_size()), (rank / 2, 2));
        let mine = input(rank, shape, DType::F32);
        // Several rounds, so that the groups' messages interleave on the shared sockets.
        for round in 0..5 {
            let sum = group.all_reduce_sum(&mine)?;
            let want = (input(members[0], shape, DType::F32)
                + input(members[1], shape, DType::F32))
            .unwrap();
            assert_same(&sum, &want, "subgroup all_reduce_sum");
            let gathered = group.all_gather(&mine, 1)?;
            let parts: Vec<Tensor> = members
                .iter()
                .map(|&r| input(r, shape, DType::F32))
                .collect();
            assert_same(
                &gathered,
                &Tensor::cat(&parts, 1).unwrap(),
                "subgroup all_gather",
            );
            let other = 1 - group.rank();
            group.send(&input(100 + round, shape, DType::F32), other)?;
            let got = group.recv(other, &Device::Cpu)?;
            assert_same(
                &got,
                &input(100 + round, shape, DType::F32),
                "subgroup send/recv",
            );
        }
        // The world communicator is still in step after the subgroups' traffic.
        let sum = comm.all_reduce_sum(&mine)?;
        assert_same(
            &sum,
            &reference_sum(4, shape, DType::F32),
            "world after subgroups",
        );
        // Same member list twice: distinct groups; a nested subgroup of one rank.
        let again = comm.subgroup(&members)?;
        again.barrier()?;
        let solo = group.subgroup(&[group.rank()])?;
        assert_same(&solo.all_reduce_sum(&mine)?, &mine, "subgroup of one");
        assert!(group.bytes_sent() > 0);
        Ok(())
    });
    for (rank, r) in results.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
    }
}

#[test]
fn collectives_called_out_of_order_are_an_error() {
    let results = with_mesh(2, quick_timeouts(), |rank, comm| {
        let t = input(rank, (2, 2), DType::F32);
        if rank == 0 {
            comm.all_gather(&t, 0).map(|_| ())
        } else {
            comm.all_reduce_sum(&t).map(|_| ())
        }
    });
    for (rank, r) in results.into_iter().enumerate() {
        let msg = r.expect_err("mismatched collectives must fail").to_string();
        assert!(msg.starts_with(&format!("rank {rank}:")), "{msg}");
        assert!(msg.contains("same order"), "{msg}");
    }
}

#[test]
fn unreachable_peer_is_an_error_within_the_connect_deadline() {
    // A port that was free a moment ago: nothing listens there.
    let (listeners, mut addrs) = bind_listeners(2);
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    addrs[0] = dead.local_addr().unwrap();
    drop(dead);
    let timeouts = Timeouts {
        connect: Duration::from_millis(600),
        ..quick_timeouts()
    };
    let mut listeners = listeners.into_iter();
    drop(listeners.next());
    let config = TcpMeshConfig {
        rank: 1,
        peers: addrs.clone(),
        timeouts: timeouts.clone(),
        secret: MeshSecret::random(),
    };
    let listener = listeners.next().unwrap();
    let err = hang_guard("connecting to a dead port", move || {
        TcpMesh::connect_with_listener(config, listener)
            .err()
            .expect("no peer listens")
    });
    let msg = err.to_string();
    // It gave up because its connect deadline passed (the error carries the deadline it had).
    assert!(
        matches!(err, CommError::Connect { after, .. } if after == Duration::from_millis(600)),
        "{msg}"
    );
    assert!(msg.starts_with("rank 1:"), "{msg}");
    assert!(
        msg.contains(&format!("rank 0 ({}) within 600ms", addrs[0])),
        "{msg}"
    );

    // The other side: rank 0 waits for a rank 1 that never comes.
    let (listeners, addrs) = bind_listeners(2);
    let config = TcpMeshConfig {
        rank: 0,
        peers: addrs.clone(),
        timeouts,
        secret: MeshSecret::random(),
    };
    let listener = listeners.into_iter().next().unwrap();
    let err = hang_guard("waiting for a rank that never comes", move || {
        TcpMesh::connect_with_listener(config, listener)
            .err()
            .expect("rank 1 never connects")
    });
    let msg = err.to_string();
    assert!(matches!(err, CommError::Connect { .. }), "{msg}");
    assert!(msg.starts_with("rank 0:"), "{msg}");
    assert!(
        msg.contains(&format!("rank 1 ({}) within 600ms", addrs[1])),
        "{msg}"
    );
}

#[test]
fn handshake_rejects_a_peer_of_another_world_size() {
    let (mut listeners, mut addrs) = bind_listeners(2);
    let timeouts = Timeouts {
        connect: Duration::from_millis(1500),
        ..quick_timeouts()
    };
    let listener1 = listeners.pop().unwrap();
    let listener0 = listeners.pop().unwrap();
    let secret = MeshSecret::random();
    let config0 = TcpMeshConfig {
        rank: 0,
        peers: addrs.clone(),
        timeouts: timeouts.clone(),
        secret: secret.clone(),
    };
    // Rank 1 believes in a world of 3.
    let (_spare, extra) = bind_listeners(1);
    addrs.extend(extra);
    let config1 = TcpMeshConfig {
        rank: 1,
        peers: addrs,
        timeouts,
        secret,
    };
    let (r0, r1) = std::thread::scope(|s| {
        let h0 = s.spawn(|| TcpMesh::connect_with_listener(config0, listener0));
        let h1 = s.spawn(|| TcpMesh::connect_with_listener(config1, listener1));
        (h0.join().unwrap(), h1.join().unwrap())
    });
    let e1 = r1.err().expect("rank 1 is rejected");
    let msg = e1.to_string();
    assert!(matches!(e1, CommError::Handshake { .. }), "{msg}");
    assert!(msg.starts_with("rank 1: handshake with rank 0"), "{msg}");
    assert!(msg.contains("world size of 3"), "{msg}");
    let msg = r0.err().expect("rank 0 never gets its rank 1").to_string();
    assert!(
        msg.starts_with("rank 0:") && msg.contains("world size of 3"),
        "{msg}"
    );
}

/// A rank of another secret (another job's, or a process that only guessed the addresses) is
/// refused in the handshake, on both sides, before any rank is taken.
#[test]
fn handshake_rejects_a_peer_without_the_mesh_secret() {
    let (mut listeners, addrs) = bind_listeners(2);
    let timeouts = Timeouts {
        connect: Duration::from_millis(1500),
        ..quick_timeouts()
    };
    let listener1 = listeners.pop().unwrap();
    let listener0 = listeners.pop().unwrap();
    let config0 = TcpMeshConfig {
        rank: 0,
        peers: addrs.clone(),
        timeouts: timeouts.clone(),
        secret: MeshSecret::random(),
    };
    let config1 = TcpMeshConfig {
        rank: 1,
        peers: addrs,
        timeouts,
        secret: MeshSecret::random(),
    };
    let (r0, r1) = hang_guard("ranks of two secrets", move || {
        std::thread::scope(|s| {
            let h0 = s.spawn(|| TcpMesh::connect_with_listener(config0, listener0));
            let h1 = s.spawn(|| TcpMesh::connect_with_listener(config1, listener1));
            (h0.join().unwrap().err(), h1.join().unwrap().err())
        })
    });
    let e1 = r1.expect("rank 1 is rejected");
    let msg = e1.to_string();
    assert!(matches!(e1, CommError::Handshake { .. }), "{msg}");
    assert!(
        msg.contains("does not hold this job's mesh secret"),
        "{msg}"
    );
    // rank 1 hangs up once rank 0's proof fails, before it sends its own
    let msg = r0.expect("rank 0 never gets a rank 1").to_string();
    assert!(
        msg.starts_with("rank 0:") && msg.contains("no proof of the mesh secret"),
        "{msg}"
    );
}

/// A process that connects first and claims rank 1 with a well-formed hello but no proof of
/// the secret does not take the rank (it once did: the first to connect took it); the real
/// rank 1 joins after it and the mesh works.
#[test]
fn an_impostor_that_claims_a_rank_first_does_not_take_it() {
    use std::io::{Read, Write};
    let (listeners, addrs) = bind_listeners(2);
    let secret = MeshSecret::random();
    let mut impostor = std::net::TcpStream::connect(addrs[0]).expect("connect to rank 0");
    let mut hello = Vec::new();
    hello.extend_from_slice(&0x4C54_4B48u32.to_le_bytes()); // the hello magic
    hello.extend_from_slice(&2u16.to_le_bytes()); // protocol version
    hello.extend_from_slice(&2u32.to_le_bytes()); // world size
    hello.extend_from_slice(&1u32.to_le_bytes()); // "I am rank 1"
    hello.extend_from_slice(&0u32.to_le_bytes()); // dialing rank 0
    hello.extend_from_slice(&[0u8; 16]); // its nonce
    impostor.write_all(&hello).unwrap();
    // rank 0 answers with its challenge: magic, CHALLENGE, nonce, proof (53 bytes)
    let (listener0, listener1) = {
        let mut it = listeners.into_iter();
        (it.next().unwrap(), it.next().unwrap())
    };
    let (config0, config1) = (
        TcpMeshConfig {
            rank: 0,
            peers: addrs.clone(),
            timeouts: quick_timeouts(),
            secret: secret.clone(),
        },
        TcpMeshConfig {
            rank: 1,
            peers: addrs,
            timeouts: quick_timeouts(),
            secret,
        },
    );
    let results = hang_guard("a mesh beside an impostor", move || {
        std::thread::scope(|s| {
            let h0 = s.spawn(|| {
                let mesh = TcpMesh::connect_with_listener(config0, listener0)?;
                mesh.all_reduce_sum(&input(0, (2, 2), DType::F32))
            });
            // the real rank 1 dials only once the impostor has had its challenge
            let mut challenge = [0u8; 53];
            impostor
                .read_exact(&mut challenge)
                .expect("rank 0 challenges it");
            impostor.write_all(&[0xAA; 32]).unwrap(); // a made-up proof
            let mut verdict = [0u8; 3];
            impostor
                .read_exact(&mut verdict)
                .expect("rank 0 answers it");
            assert_eq!(verdict[0], 0, "the impostor was accepted as rank 1");
            let h1 = s.spawn(|| {
                let mesh = TcpMesh::connect_with_listener(config1, listener1)?;
                mesh.all_reduce_sum(&input(1, (2, 2), DType::F32))
            });
            (h0.join().unwrap(), h1.join().unwrap())
        })
    });
    let expected = reference_sum(2, (2, 2), DType::F32);
    assert_same(&results.0.unwrap(), &expected, "rank 0's sum");
    assert_same(&results.1.unwrap(), &expected, "rank 1's sum");
}

#[test]
fn a_peer_that_dies_mid_collective_is_an_error_not_a_hang() {
    // An operation time-out longer than the hang guard: an error can only come from the lost
    // connection (checked below by its kind), never from waiting the time-out out.
    let timeouts = Timeouts {
        op: Duration::from_secs(600),
        ..quick_timeouts()
    };
    let results = hang_guard("a collective with a dead peer", move || {
        with_mesh(3, timeouts, |rank, comm| {
            if rank == 2 {
                // Dies: its sockets close while the others wait for its part.
                drop(comm);
                return None;
            }
            Some(comm.all_gather(&input(rank, (2, 2), DType::F32), 0))
        })
    });
    for (rank, r) in results.into_iter().take(2).enumerate() {
        let err = r.unwrap().expect_err("rank 2 is gone");
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                CommError::ConnectionLost {
                    op: Op::AllGather,
                    ..
                }
            ),
            "{msg}"
        );
        // Rank 1 hears from rank 0 first (rank 0 sends to it before anything else), so its
        // error is about rank 2. Rank 0 waits for rank 1 first, which may already have failed
        // and left: a lost connection to either is the right answer there.
        let allowed: &[&str] = if rank == 1 { &["2"] } else { &["1", "2"] };
        let prefix = format!("rank {rank}: connection to rank ");
        assert!(msg.starts_with(&prefix), "{msg}");
        let named = &msg[prefix.len()..prefix.len() + 1];
        assert!(allowed.contains(&named), "{msg}");
        assert!(msg.contains("(127.0.0.1:"), "{msg}");
    }
}

#[test]
fn a_silent_peer_times_out() {
    let timeouts = Timeouts {
        op: Duration::from_millis(300),
        ..quick_timeouts()
    };
    // Rank 1 stays alive, connected and silent until rank 0 has given up: rank 0's error can
    // only be its own time-out (an event, not a clock reading).
    let (gave_up, wait) = std::sync::mpsc::channel::<()>();
    let wait = std::sync::Mutex::new(wait);
    let results = hang_guard("a collective with a silent peer", move || {
        with_mesh(2, timeouts, move |rank, comm| {
            if rank == 1 {
                let given_up = wait.lock().unwrap().recv_timeout(HANG_GUARD);
                assert!(
                    given_up.is_ok(),
                    "hang guard ({HANG_GUARD:?}): rank 0 never gave up"
                );
                drop(comm);
                return None;
            }
            let r = comm.all_reduce_sum(&input(0, (2, 2), DType::F32));
            gave_up.send(()).unwrap();
            Some(r)
        })
    });
    let r = results.into_iter().next().unwrap().unwrap();
    let msg = r.expect_err("rank 1 never answers").to_string();
    assert!(
        msg.starts_with("rank 0: recv from rank 1 (127.0.0.1:")
            && msg.contains("all_reduce_sum timed out after 300ms"),
        "{msg}"
    );
}

/// A connection that never says hello (a port scanner, a hostile or hung process) holds up no
/// rank: the ranks' handshakes are read beside it, and the mesh forms while it is still open.
/// (Handshakes were read one at a time, so it stalled the setup until the connect deadline.)
#[test]
fn a_silent_connection_does_not_hold_up_the_mesh() {
    // Rank 1 waits 2 s for its answer; rank 0 would wait 30 s for a hello on one connection.
    let timeouts = |rank: usize| Timeouts {
        connect: Duration::from_secs(if rank == 0 { 30 } else { 2 }),
        ..quick_timeouts()
    };
    let (listeners, addrs) = bind_listeners(2);
    let secret = MeshSecret::random();
    // queued on rank 0's listener before rank 1 dials, so it is accepted first
    let silent = std::net::TcpStream::connect(addrs[0]).expect("connect to rank 0");
    let results = hang_guard("a mesh beside a silent connection", move || {
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let config = TcpMeshConfig {
                        rank,
                        peers: addrs.clone(),
                        timeouts: timeouts(rank),
                        secret: secret.clone(),
                    };
                    s.spawn(move || {
                        let mesh = TcpMesh::connect_with_listener(config, listener)
                            .map_err(|e| e.to_string())?;
                        mesh.all_reduce_sum(&input(rank, (2, 2), DType::F32))
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread panicked"))
                .collect::<Vec<_>>()
        })
    });
    for (rank, result) in results.into_iter().enumerate() {
        assert_eq!(result, Ok(()), "rank {rank}");
    }
    drop(silent);
}

#[test]
fn misuse_is_reported() -> TestResult {
    let results = with_mesh(2, quick_timeouts(), |rank, comm| {
        let t = input(rank, (2, 2), DType::F32);
        let errors = [
            comm.send(&t, rank).err(),
            comm.send(&t, 5).err(),
            comm.all_gather(&t, 2).err(),
            comm.all_to_all(vec![t.clone()]).err(),
            comm.subgroup(&[1 - rank]).err(),
            comm.subgroup(&[1, 0]).err(),
            comm.broadcast(None, rank, &Device::Cpu).err(),
        ];
        // Still usable afterwards: nothing was sent.
        let sum = comm.all_reduce_sum(&t).map(|_| ());
        (errors.map(|e| e.map(|e| e.to_string())), sum)
    });
    for (rank, (errors, sum)) in results.into_iter().enumerate() {
        for e in errors {
            let msg = e.expect("misuse must fail");
            assert!(msg.starts_with(&format!("rank {rank}:")), "{msg}");
        }
        sum?;
    }
    Ok(())
}

/// The mesh secret the ranks of `ranks_as_os_processes` share (each learns it as the child
/// process it is, from this file).
const OS_PROCESS_SECRET: [u8; 32] = [0x5e; 32];

/// Child mode of `ranks_as_os_processes`: this test binary, re-run with
/// `LONGTAKE_TEST_COMM_CHILD` set, binds a port, prints its address, reads every rank's address
/// (in rank order, comma-separated) from stdin and joins the mesh as the rank whose address is
/// its own.
#[test]
fn os_process_rank() -> TestResult {
    if std::env::var("LONGTAKE_TEST_COMM_CHILD").is_err() {
        return Ok(()); // not a child: `ranks_as_os_processes` drives this
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let own = listener.local_addr()?;
    println!("LONGTAKE_ADDR {own}");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let peers: Vec<SocketAddr> = line
        .trim()
        .split(',')
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let rank = peers
        .iter()
        .position(|&a| a == own)
        .ok_or("own address not listed")?;
    let n = peers.len();
    let comm = TcpMesh::connect_with_listener(
        TcpMeshConfig {
            rank,
            peers,
            timeouts: quick_timeouts(),
            secret: MeshSecret::new(OS_PROCESS_SECRET),
        },
        listener,
    )?;
    let sum = comm.all_reduce_sum(&input(rank, (4, 4), DType::BF16))?;
    assert_same(
        &sum,
        &reference_sum(n, (4, 4), DType::BF16),
        "all_reduce_sum",
    );
    let gathered = comm.all_gather(&input(rank, (1, 3), DType::F32), 0)?;
    let parts: Vec<Tensor> = (0..n).map(|r| input(r, (1, 3), DType::F32)).collect();
    assert_same(&gathered, &Tensor::cat(&parts, 0)?, "all_gather");
    comm.barrier()?;
    println!("LONGTAKE_RANK_OK {rank}");
    Ok(())
}

#[test]
fn ranks_as_os_processes() -> TestResult {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    if std::env::var("LONGTAKE_TEST_COMM_CHILD").is_ok() {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "os_process_rank",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("LONGTAKE_TEST_COMM_CHILD", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = BufReader::new(child.stdout.take().ok_or("child stdout")?);
        let mut line = String::new();
        let addr = loop {
            line.clear();
            if out.read_line(&mut line)? == 0 {
                return Err("child exited before printing its address".into());
            }
            // The harness prints "test os_process_rank ... " on the same line.
            if let Some((_, addr)) = line.trim().split_once("LONGTAKE_ADDR ") {
                break addr.parse::<SocketAddr>()?;
            }
        };
        addrs.push(addr);
        children.push((child, out));
    }
    let peers = addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",");
    for (child, _) in &mut children {
        writeln!(child.stdin.take().ok_or("child stdin")?, "{peers}")?;
    }
    for (rank, (mut child, mut out)) in children.into_iter().enumerate() {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest)?;
        let status = child.wait()?;
        assert!(status.success(), "rank {rank} failed:\n{rest}");
        assert!(
            rest.contains(&format!("LONGTAKE_RANK_OK {rank}")),
            "rank {rank}:\n{rest}"
        );
    }
    Ok(())
}
