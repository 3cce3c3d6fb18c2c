//! Fuzzed inputs at the worker's edges: safetensors files (checkpoint weights and denoiser
//! state files: random bytes, or a real file with its header changed or cut) and tokenizer files
//! (a real one with bytes changed) are read or refused with an error, never a panic; a
//! connection that sends any bytes to a rank's mesh port takes no rank and stops no mesh; and a
//! peer that completes the handshake and then sends any frames makes the collective fail with an
//! error, never a panic or a hang.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use longtake_worker::model::denoiser::DenoiserState;
use longtake_worker::model::loader::SafetensorsWeights;
use longtake_worker::model::tokenizer::PromptTokenizer;
use longtake_worker::parallel::mesh_secret::{self, Side};
use longtake_worker::parallel::{Communicator, MeshSecret, TcpMesh, TcpMeshConfig, Timeouts};
use proptest::prelude::*;

fn toy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("toy/model")
        .join(path)
}

/// The toy transformer's safetensors: its 8-byte header length, its JSON header and the start
/// of its data (what a change to the header can reach).
fn safetensors_head() -> Vec<u8> {
    let bytes = std::fs::read(toy("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[..(8 + header + 4096).min(bytes.len())].to_vec()
}

fn changed(
    mut bytes: Vec<u8>,
    edits: &[(prop::sample::Index, u8)],
    cut: Option<prop::sample::Index>,
) -> Vec<u8> {
    for (at, byte) in edits {
        let i = at.index(bytes.len());
        bytes[i] = *byte;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut.index(bytes.len()));
    }
    bytes
}

fn read_as_weights(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    if let Ok(weights) = SafetensorsWeights::open_file(&path) {
        let names: Vec<String> = weights.names().map(str::to_string).collect();
        for name in names.iter().take(4) {
            let _ = weights.load(name, &Device::Cpu);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_safetensors_bytes_are_read_or_refused(
        random in proptest::collection::vec(any::<u8>(), 0..256),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let origin = Path::new("fuzzed.safetensors");
        let _ = DenoiserState::from_bytes(&random, origin, &Device::Cpu);
        read_as_weights(&random);
        let head = changed(safetensors_head(), &edits, cut);
        let _ = DenoiserState::from_bytes(&head, origin, &Device::Cpu);
        read_as_weights(&head);
    }

    #[test]
    fn any_tokenizer_file_is_read_or_refused(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let text = std::fs::read(toy("tokenizer/tokenizer.json")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, changed(text, &edits, cut)).unwrap();
        if let Ok(tokenizer) = PromptTokenizer::from_file(&path) {
            let _ = tokenizer.encode("a red circle moving left on a blue background", 16);
        }
    }
}

fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// A connection to rank 0's mesh port that sends `junk` (then hangs up, or stays silent)
    /// neither takes rank 1's place nor stops the mesh: ranks 0 and 1 connect and reduce.
    #[test]
    fn junk_on_a_mesh_port_takes_no_rank(
        junk in proptest::collection::vec(any::<u8>(), 0..120),
        hang_up in any::<bool>(),
    ) {
        let ((l0, a0), (l1, a1)) = (bind(), bind());
        let secret = MeshSecret::random();
        let timeouts = Timeouts {
            connect: Duration::from_secs(20),
            op: Duration::from_secs(20),
            retry_interval: Duration::from_millis(10),
        };
        let config = |rank| TcpMeshConfig {
            rank,
            peers: vec![a0, a1],
            timeouts: timeouts.clone(),
            secret: secret.clone(),
        };
        let mut intruder = std::net::TcpStream::connect(a0).unwrap();
        let _ = intruder.write_all(&junk);
        if hang_up {
            drop(intruder);
        } else {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(30));
                drop(intruder);
            });
        }
        let (c0, c1) = (config(0), config(1));
        let sums = std::thread::scope(|s| {
            let ranks = [(c0, l0), (c1, l1)].map(|(config, listener)| {
                s.spawn(move || {
                    let mesh = TcpMesh::connect_with_listener(config, listener)
                        .map_err(|e| e.to_string())?;
                    let one = candle_core::Tensor::ones(2, candle_core::DType::F32, &Device::Cpu)
                        .unwrap();
                    let sum = mesh.all_reduce_sum(&one).map_err(|e| e.to_string())?;
                    sum.to_vec1::<f32>().map_err(|e| e.to_string())
                })
            });
            ranks.map(|h| h.join().unwrap())
        });
        for sum in sums {
            prop_assert_eq!(sum, Ok(vec![2.0, 2.0]));
        }
    }
}

/// Dials rank 0 at `address` as rank 1 of 2 with `secret`, completes the handshake and returns
/// the connection.
fn join_as_rank_1(address: SocketAddr, secret: &MeshSecret) -> std::net::TcpStream {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    let mut hello = Vec::new();
    hello.extend_from_slice(&0x4C54_4B48u32.to_le_bytes()); // the hello magic
    hello.extend_from_slice(&2u16.to_le_bytes()); // protocol version
    hello.extend_from_slice(&2u32.to_le_bytes()); // world size
    hello.extend_from_slice(&1u32.to_le_bytes()); // this rank
    hello.extend_from_slice(&0u32.to_le_bytes()); // the rank dialed
    let nonce = mesh_secret::nonce();
    stream.write_all(&hello).unwrap();
    stream.write_all(&nonce).unwrap();
    let mut challenge = [0u8; 5 + mesh_secret::NONCE_BYTES + mesh_secret::PROOF_BYTES];
    stream.read_exact(&mut challenge).unwrap();
    let theirs: [u8; mesh_secret::NONCE_BYTES] = challenge[5..21].try_into().unwrap();
    stream
        .write_all(&secret.proof(Side::Dialer, &hello, &nonce, &theirs))
        .unwrap();
    let mut verdict = [0u8; 3];
    stream.read_exact(&mut verdict).unwrap();
    assert_eq!(verdict[0], 1, "rank 0 refused a rank holding the secret");
    stream
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// After a valid handshake, rank 1 sends `frames` (random bytes, or a frame header with the
    /// mesh's magic and any fields) and hangs up: rank 0's reduction is an error.
    #[test]
    fn any_frames_from_a_joined_peer_end_in_an_error(
        junk in proptest::collection::vec(any::<u8>(), 0..200),
        framed in any::<bool>(),
    ) {
        let (listener, address) = bind();
        let secret = MeshSecret::random();
        let config = TcpMeshConfig {
            rank: 0,
            peers: vec![address, "127.0.0.1:9".parse().unwrap()],
            timeouts: Timeouts {
                connect: Duration::from_secs(20),
                op: Duration::from_secs(20),
                retry_interval: Duration::from_millis(10),
            },
            secret: secret.clone(),
        };
        let rank0 = std::thread::spawn(move || {
            let mesh = TcpMesh::connect_with_listener(config, listener).map_err(|e| e.to_string())?;
            let one = candle_core::Tensor::ones(2, candle_core::DType::F32, &Device::Cpu).unwrap();
            mesh.all_reduce_sum(&one).map(|_| ()).map_err(|e| e.to_string())
        });
        let mut peer = join_as_rank_1(address, &secret);
        let mut bytes = Vec::new();
        if framed {
            bytes.extend_from_slice(&0x4C54_4B46u32.to_le_bytes()); // the frame magic
        }
        bytes.extend_from_slice(&junk);
        let _ = peer.write_all(&bytes);
        drop(peer);
        let outcome = rank0.join().expect("rank 0 panicked");
        prop_assert!(outcome.is_err(), "a reduction with junk succeeded");
    }
}
