//! The TCP mesh: one socket between every pair of ranks, over loopback or a LAN, for CPU jobs
//! and tests. Ranks may be threads of one process or separate processes.
//!
//! Each rank listens on its own address; rank j dials every rank i < j and accepts the ranks
//! above it. In the handshake both ranks prove they hold the attempt's mesh secret
//! ([`MeshSecret`]), so a process that merely reaches a mesh port cannot take a rank; it then
//! carries (world size, dialing rank, expected rank), so a misconfigured rank list is rejected
//! with an error that says why.
//!
//! The mesh owns a small tokio runtime. One reader task per peer drains its socket into an
//! inbox keyed by (group, sender), so sends never wait for the receiver's code to call `recv`
//! and two ranks sending to each other cannot deadlock. The synchronous `Communicator` calls
//! write on the caller's thread (blocking on the runtime) and wait on the inbox with a deadline.
//! They must not be called from inside another tokio runtime's async context.
//!
//! Frame (little-endian): magic u32, group u64, sequence u64, op u8, dtype u8, rank of the
//! shape u8, payload length u64, the dims (u64 each), the payload (the tensor's raw bytes).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

use super::comm::{
    self, check_subgroup, dtype_from_code, CommError, Communicator, Encoded, Op, PeerId,
    PointToPoint, Received, Result,
};
use super::mesh_secret::{self, MeshSecret, Side, NONCE_BYTES, PROOF_BYTES};

const FRAME_MAGIC: u32 = 0x4C54_4B46; // "LTKF"
const HELLO_MAGIC: u32 = 0x4C54_4B48; // "LTKH"
const ACK_MAGIC: u32 = 0x4C54_4B41; // "LTKA"
const PROTOCOL_VERSION: u16 = 2;
const FRAME_HEADER_LEN: usize = 4 + 8 + 8 + 1 + 1 + 1 + 8;
const MAX_TENSOR_RANK: usize = 16;
/// The most bytes one frame's tensor may have (16 GiB: the largest exchange of a 14B model at
/// 720p is about 3 GB). A header claiming more is a protocol error, and below it the payload's
/// memory grows only as its bytes arrive, so a peer cannot make this process allocate what it
/// does not send.
const MAX_FRAME_PAYLOAD_BYTES: u64 = 16 << 30;
/// What a payload's buffer starts with before its bytes arrive.
const PAYLOAD_PREALLOCATION: u64 = 64 << 20;
/// The group of the whole mesh; subgroups derive theirs from it.
const WORLD_GROUP: u64 = 1;

/// `n` listeners on loopback ports the OS picks, with their addresses: the mesh of a job whose
/// ranks all run on this machine (tests, benchmarks), before each rank connects with
/// [`TcpMesh::connect_with_listener`].
pub fn loopback_listeners(
    n: usize,
) -> std::io::Result<(Vec<std::net::TcpListener>, Vec<SocketAddr>)> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let addrs = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok((listeners, addrs))
}

/// How long the blocking operations of a mesh may wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// Deadline for the whole mesh to come up: peers may start late, dials are retried until
    /// then.
    pub connect: Duration,
    /// Deadline for one collective (or one send / recv) to complete on this rank.
    pub op: Duration,
    /// Pause between dial attempts while a peer is not listening yet.
    pub retry_interval: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(30),
            op: Duration::from_secs(60),
            retry_interval: Duration::from_millis(50),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TcpMeshConfig {
    /// This rank, an index into `peers`.
    pub rank: usize,
    /// Every rank's listening address, this rank's own included; the world size is its length.
    pub peers: Vec<SocketAddr>,
    pub timeouts: Timeouts,
    /// What every rank of this mesh holds and proves in the handshake (see [`MeshSecret`]).
    pub secret: MeshSecret,
}

impl TcpMeshConfig {
    pub fn new(rank: usize, peers: Vec<SocketAddr>, secret: MeshSecret) -> Self {
        Self {
            rank,
            peers,
            timeouts: Timeouts::default(),
            secret,
        }
    }
}

/// A communicator over a TCP mesh: the whole mesh (from [`TcpMesh::connect`]) or one of its
/// subgroups, which share the mesh's sockets.
pub struct TcpMesh {
    mesh: Arc<Mesh>,
    group: u64,
    /// Global ranks of the members; group rank i is `members[i]`.
    members: Vec<usize>,
    group_rank: usize,
    /// Next sequence number per member, for messages to it and from it.
    send_seq: Mutex<Vec<u64>>,
    recv_seq: Mutex<Vec<u64>>,
    /// How many subgroups with a given member list this communicator has made, so that the
    /// same list asked for twice gives two distinct groups on every member.
    subgroups_made: Mutex<HashMap<Vec<usize>, u64>>,
    bytes_sent: AtomicU64,
}

/// The connections of one rank, shared by the world communicator and its subgroups.
struct Mesh {
    rank: usize,
    addrs: Vec<SocketAddr>,
    timeouts: Timeouts,
    /// Write half of the socket to each peer (`None` for this rank).
    writers: Vec<Option<tokio::sync::Mutex<OwnedWriteHalf>>>,
    inbox: Arc<Inbox>,
    total_bytes_sent: AtomicU64,
    /// Declared last: the sockets close before the runtime (and its reader tasks) goes away.
    runtime: Runtime,
}

struct Frame {
    seq: u64,
    op: u8,
    message: Received,
}

#[derive(Default)]
struct InboxState {
    queues: HashMap<(u64, usize), VecDeque<Frame>>,
    /// Why the connection to a peer is gone, once it is.
    lost: Vec<Option<String>>,
}

/// Messages that arrived and are not taken yet, filled by the reader tasks.
struct Inbox {
    state: Mutex<InboxState>,
    arrived: Condvar,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, group: u64, from: usize, frame: Frame) {
        self.lock()
            .queues
            .entry((group, from))
            .or_default()
            .push_back(frame);
        self.arrived.notify_all();
    }

    fn mark_lost(&self, peer: usize, reason: String) {
        let mut state = self.lock();
        if state.lost[peer].is_none() {
            state.lost[peer] = Some(reason);
        }
        drop(state);
        self.arrived.notify_all();
    }

    fn lost(&self, peer: usize) -> Option<String> {
        self.lock().lost[peer].clone()
    }
}

impl TcpMesh {
    /// Binds this rank's address from `config.peers` and connects to every other rank.
    pub fn connect(config: TcpMeshConfig) -> Result<Self> {
        let addr = check_config(&config)?;
        let listener = std::net::TcpListener::bind(addr).map_err(|source| CommError::Listen {
            rank: config.rank,
            addr,
            source,
        })?;
        Self::connect_with_listener(config, listener)
    }

    /// Like [`TcpMesh::connect`], with this rank's listener already bound (e.g. to port 0, the
    /// real address then being handed to the other ranks): no race for a free port.
    pub fn connect_with_listener(
        config: TcpMeshConfig,
        listener: std::net::TcpListener,
    ) -> Result<Self> {
        let own_addr = check_config(&config)?;
        let TcpMeshConfig {
            rank,
            peers,
            timeouts,
            secret,
        } = config;
        let world = peers.len();
        let listen_err = |source| CommError::Listen {
            rank,
            addr: own_addr,
            source,
        };
        listener.set_nonblocking(true).map_err(listen_err)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("longtake-comm")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|source| CommError::Runtime { rank, source })?;

        let streams = runtime.block_on(establish(
            rank,
            peers.clone(),
            timeouts.clone(),
            secret,
            listener,
        ))?;

        let inbox = Arc::new(Inbox {
            state: Mutex::new(InboxState {
                queues: HashMap::new(),
                lost: vec![None; world],
            }),
            arrived: Condvar::new(),
        });
        let mut writers = Vec::with_capacity(world);
        for (peer, stream) in streams.into_iter().enumerate() {
            writers.push(stream.map(|stream| {
                let (read, write) = stream.into_split();
                runtime.spawn(read_frames(read, peer, inbox.clone()));
                tokio::sync::Mutex::new(write)
            }));
        }
        let mesh = Arc::new(Mesh {
            rank,
            addrs: peers,
            timeouts,
            writers,
            inbox,
            total_bytes_sent: AtomicU64::new(0),
            runtime,
        });
        Ok(Self::group(mesh, WORLD_GROUP, (0..world).collect()))
    }

    fn group(mesh: Arc<Mesh>, group: u64, members: Vec<usize>) -> Self {
        let n = members.len();
        let group_rank = members
            .iter()
            .position(|&r| r == mesh.rank)
            .expect("members include this rank");
        Self {
            mesh,
            group,
            members,
            group_rank,
            send_seq: Mutex::new(vec![0; n]),
            recv_seq: Mutex::new(vec![0; n]),
            subgroups_made: Mutex::new(HashMap::new()),
            bytes_sent: AtomicU64::new(0),
        }
    }

    /// This rank in the mesh's (global) numbering.
    pub fn global_rank(&self) -> usize {
        self.mesh.rank
    }

    /// The global ranks of this communicator's members, in group-rank order.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// Bytes this rank has written to the mesh through all its communicators.
    pub fn total_bytes_sent(&self) -> u64 {
        self.mesh.total_bytes_sent.load(Ordering::Relaxed)
    }
}

fn check_config(config: &TcpMeshConfig) -> Result<SocketAddr> {
    config
        .peers
        .get(config.rank)
        .copied()
        .ok_or_else(|| CommError::Usage {
            rank: config.rank,
            op: Op::Connect,
            reason: format!(
                "rank {} is out of range for {} peer addresses",
                config.rank,
                config.peers.len()
            ),
        })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A 64-bit FNV-1a hash: stable across processes and builds, unlike std's hasher.
fn fnv1a(words: impl IntoIterator<Item = u64>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in words {
        for b in w.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl PointToPoint for TcpMesh {
    fn global_rank(&self) -> usize {
        self.mesh.rank
    }

    fn group_rank(&self) -> usize {
        self.group_rank
    }

    fn group_size(&self) -> usize {
        self.members.len()
    }

    fn op_timeout(&self) -> Duration {
        self.mesh.timeouts.op
    }

    fn peer(&self, group_rank: usize) -> PeerId {
        self.mesh.peer(self.members[group_rank])
    }

    fn send_message(&self, to: usize, op: Op, message: &Encoded) -> Result<()> {
        let seq = {
            let mut seqs = lock(&self.send_seq);
            let seq = seqs[to];
            seqs[to] += 1;
            seq
        };
        let mut header = Vec::with_capacity(FRAME_HEADER_LEN + 8 * message.shape.len());
        let payload = message.bytes();
        header.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        header.extend_from_slice(&self.group.to_le_bytes());
        header.extend_from_slice(&seq.to_le_bytes());
        header.push(op.wire_code());
        header.push(message.dtype);
        // Tensors of rank > 255 do not exist in this code base; the reader rejects > 16.
        header.push(message.shape.len() as u8);
        header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        for &d in &message.shape {
            header.extend_from_slice(&(d as u64).to_le_bytes());
        }
        self.mesh
            .write_frame(self.members[to], op, &header, payload)?;
        let bytes = (header.len() + payload.len()) as u64;
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        self.mesh
            .total_bytes_sent
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    fn recv_message(&self, from: usize, op: Op, deadline: Instant) -> Result<Received> {
        let frame = self
            .mesh
            .take_frame(self.group, self.members[from], op, deadline)?;
        let expected = lock(&self.recv_seq)[from];
        let protocol = |reason: String| CommError::Protocol {
            rank: self.mesh.rank,
            peer: self.peer(from),
            op,
            reason,
        };
        if frame.op != op.wire_code() {
            let theirs = Op::from_wire_code(frame.op).map_or_else(
                || format!("unknown operation {}", frame.op),
                |o| o.to_string(),
            );
            return Err(protocol(format!(
                "it is in {theirs}; every rank of a group must call the collectives in the same order"
            )));
        }
        if frame.seq != expected {
            return Err(protocol(format!(
                "message {} arrived where message {expected} was due",
                frame.seq
            )));
        }
        lock(&self.recv_seq)[from] += 1;
        Ok(frame.message)
    }
}

impl Mesh {
    fn peer(&self, rank: usize) -> PeerId {
        PeerId {
            rank,
            addr: self.addrs.get(rank).copied(),
        }
    }

    fn lost_error(&self, peer: usize, op: Op, reason: String) -> CommError {
        CommError::ConnectionLost {
            rank: self.rank,
            peer: self.peer(peer),
            op,
            reason,
        }
    }

    fn write_frame(&self, to: usize, op: Op, header: &[u8], payload: &[u8]) -> Result<()> {
        if let Some(reason) = self.inbox.lost(to) {
            return Err(self.lost_error(to, op, reason));
        }
        let Some(writer) = self.writers[to].as_ref() else {
            unreachable!("group members other than this rank have a socket");
        };
        let write = async {
            let mut w = writer.lock().await;
            w.write_all(header).await?;
            w.write_all(payload).await
        };
        match self
            .runtime
            // The timer must be created inside the runtime: `timeout` registers with its reactor.
            .block_on(async { tokio::time::timeout(self.timeouts.op, write).await })
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                let reason = e.to_string();
                self.inbox.mark_lost(to, reason.clone());
                Err(self.lost_error(to, op, reason))
            }
            Err(_) => {
                // Part of a frame may be on the wire: the stream cannot be used any more.
                self.inbox
                    .mark_lost(to, format!("a send timed out after {:?}", self.timeouts.op));
                Err(CommError::Timeout {
                    rank: self.rank,
                    direction: "send to",
                    peer: self.peer(to),
                    op,
                    after: self.timeouts.op,
                })
            }
        }
    }

    fn take_frame(&self, group: u64, from: usize, op: Op, deadline: Instant) -> Result<Frame> {
        let mut state = self.inbox.lock();
        loop {
            if let Some(frame) = state
                .queues
                .get_mut(&(group, from))
                .and_then(VecDeque::pop_front)
            {
                return Ok(frame);
            }
            if let Some(reason) = &state.lost[from] {
                return Err(self.lost_error(from, op, reason.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    rank: self.rank,
                    direction: "recv from",
                    peer: self.peer(from),
                    op,
                    after: self.timeouts.op,
                });
            }
            state = self
                .inbox
                .arrived
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Drains one peer's socket into the inbox until it closes or sends garbage.
async fn read_frames(read: OwnedReadHalf, peer: usize, inbox: Arc<Inbox>) {
    let mut read = BufReader::with_capacity(1 << 16, read);
    let reason = loop {
        match read_frame(&mut read).await {
            Ok(Some((group, frame))) => inbox.push(group, peer, frame),
            Ok(None) => break "the peer closed the connection".to_string(),
            Err(e) => break e,
        }
    };
    inbox.mark_lost(peer, reason);
}

/// One frame, or `None` at a clean end of stream (between frames).
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    read: &mut R,
) -> std::result::Result<Option<(u64, Frame)>, String> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match read.read_exact(&mut header[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let io = |e: std::io::Error| format!("reading a message: {e}");
    read.read_exact(&mut header[1..]).await.map_err(io)?;
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let magic = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    if magic != FRAME_MAGIC {
        return Err(format!("protocol error: bad frame magic {magic:#x}"));
    }
    let group = u64_at(4);
    let seq = u64_at(12);
    let (op, dtype_code, ndim) = (header[20], header[21], header[22] as usize);
    let payload_len = u64_at(23);
    if payload_len > MAX_FRAME_PAYLOAD_BYTES {
        return Err(format!(
            "protocol error: a frame of {payload_len} payload bytes is over the mesh's limit of \
             {MAX_FRAME_PAYLOAD_BYTES}"
        ));
    }
    if ndim > MAX_TENSOR_RANK {
        return Err(format!("protocol error: a tensor of rank {ndim}"));
    }
    let mut dims = [0u8; 8 * MAX_TENSOR_RANK];
    read.read_exact(&mut dims[..8 * ndim]).await.map_err(io)?;
    let shape: Vec<usize> = dims[..8 * ndim]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
        .collect();
    let dtype = dtype_from_code(dtype_code)
        .ok_or_else(|| format!("protocol error: unknown dtype code {dtype_code}"))?;
    let expected = shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d));
    if expected != Some(payload_len as usize) {
        return Err(format!(
            "protocol error: {payload_len} payload bytes for a {dtype:?} tensor of shape {shape:?}"
        ));
    }
    let mut payload = Vec::with_capacity(payload_len.min(PAYLOAD_PREALLOCATION) as usize);
    (&mut *read)
        .take(payload_len)
        .read_to_end(&mut payload)
        .await
        .map_err(io)?;
    if payload.len() as u64 != payload_len {
        return Err(format!(
            "reading a message: the connection ended {} bytes into a payload of {payload_len}",
            payload.len()
        ));
    }
    Ok(Some((
        group,
        Frame {
            seq,
            op,
            message: Received {
                dtype: dtype_code,
                shape,
                payload,
            },
        },
    )))
}

/// Dials the ranks below this one and accepts those above, all before one deadline. Returns
/// one stream per rank (`None` for this rank).
async fn establish(
    rank: usize,
    addrs: Vec<SocketAddr>,
    timeouts: Timeouts,
    secret: MeshSecret,
    listener: std::net::TcpListener,
) -> Result<Vec<Option<TcpStream>>> {
    let world = addrs.len();
    let own_addr = addrs[rank];
    let deadline = tokio::time::Instant::now() + timeouts.connect;
    let listener = TcpListener::from_std(listener).map_err(|source| CommError::Listen {
        rank,
        addr: own_addr,
        source,
    })?;
    let addrs = Arc::new(addrs);
    let secret = Arc::new(secret);
    let mut tasks = JoinSet::new();
    for peer in 0..rank {
        let (addrs, timeouts, secret) = (addrs.clone(), timeouts.clone(), secret.clone());
        tasks.spawn(async move {
            dial(rank, peer, &addrs, &timeouts, &secret, deadline)
                .await
                .map(|s| vec![(peer, s)])
        });
    }
    if rank + 1 < world {
        let (addrs, after) = (addrs.clone(), timeouts.connect);
        tasks.spawn(async move { accept(listener, rank, &addrs, after, secret, deadline).await });
    }
    let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let connected = joined.map_err(|e| CommError::Runtime {
            rank,
            source: std::io::Error::other(e),
        })??;
        for (peer, stream) in connected {
            streams[peer] = Some(stream);
        }
    }
    Ok(streams)
}

enum DialError {
    /// Worth another attempt (the peer is starting, or went away during the handshake).
    Retry(String),
    Fatal(CommError),
}

async fn dial(
    rank: usize,
    peer: usize,
    addrs: &[SocketAddr],
    timeouts: &Timeouts,
    secret: &MeshSecret,
    deadline: tokio::time::Instant,
) -> Result<TcpStream> {
    let addr = addrs[peer];
    let peer_id = PeerId {
        rank: peer,
        addr: Some(addr),
    };
    let mut last_error = String::from("not reachable");
    loop {
        let attempt = async {
            let mut stream = TcpStream::connect(addr)
                .await
                .map_err(|e| DialError::Retry(e.to_string()))?;
            // Frames are written as header + payload; do not let Nagle hold the small header.
            let _ = stream.set_nodelay(true);
            dial_handshake(&mut stream, rank, peer, addrs.len(), secret)
                .await
                .map_err(|e| match e {
                    HandshakeError::Io(e) => {
                        DialError::Retry(format!("connection dropped in the handshake: {e}"))
                    }
                    HandshakeError::Rejected(reason) => DialError::Fatal(CommError::Handshake {
                        rank,
                        peer: peer_id,
                        reason,
                    }),
                })?;
            Ok::<_, DialError>(stream)
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(DialError::Fatal(e))) => return Err(e),
            Ok(Err(DialError::Retry(reason))) => last_error = reason,
            Err(_) => {}
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(CommError::Connect {
                rank,
                peer: peer_id,
                after: timeouts.connect,
                reason: format!("dialing it failed: {last_error}"),
            });
        }
        tokio::time::sleep_until((now + timeouts.retry_interval).min(deadline)).await;
    }
}

enum HandshakeError {
    Io(std::io::Error),
    Rejected(String),
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

/// Bytes of a hello: magic u32, version u16, world size u32, dialing rank u32, expected rank
/// u32.
const HELLO_BYTES: usize = 18;
/// The acceptor's first reply: a challenge follows.
const CHALLENGE: u8 = 0;
/// The acceptor's first reply: refused before any challenge (wrong protocol).
const REFUSED: u8 = 1;

/// The handshake, dialer's side:
/// 1. dialer → hello + dialer nonce;
/// 2. acceptor → ACK magic, then `CHALLENGE` + acceptor nonce + the acceptor's proof of the
///    mesh secret, or `REFUSED` + reason length u16 + reason;
/// 3. dialer → its own proof (only once the acceptor's holds);
/// 4. acceptor → accepted u8 + reason length u16 + reason (UTF-8).
async fn dial_handshake(
    stream: &mut TcpStream,
    rank: usize,
    peer: usize,
    world: usize,
    secret: &MeshSecret,
) -> std::result::Result<(), HandshakeError> {
    let mut hello = Vec::with_capacity(HELLO_BYTES + NONCE_BYTES);
    hello.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
    hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(peer as u32).to_le_bytes());
    let dialer_nonce = mesh_secret::nonce();
    hello.extend_from_slice(&dialer_nonce);
    stream.write_all(&hello).await?;
    let hello = &hello[..HELLO_BYTES];

    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await?;
    if u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) != ACK_MAGIC {
        return Err(HandshakeError::Rejected(
            "the process at that address is not a longtake rank".into(),
        ));
    }
    if head[4] != CHALLENGE {
        let reason = read_reason(stream).await?;
        return Err(HandshakeError::Rejected(format!(
            "it rejected this rank: {reason}"
        )));
    }
    let mut acceptor_nonce = [0u8; NONCE_BYTES];
    stream.read_exact(&mut acceptor_nonce).await?;
    let mut proof = [0u8; PROOF_BYTES];
    stream.read_exact(&mut proof).await?;
    if !secret.verify(
        Side::Acceptor,
        hello,
        &dialer_nonce,
        &acceptor_nonce,
        &proof,
    ) {
        return Err(HandshakeError::Rejected(
            "the process at that address does not hold this job's mesh secret (a rank of \
             another job, or not a rank)"
                .into(),
        ));
    }
    let own = secret.proof(Side::Dialer, hello, &dialer_nonce, &acceptor_nonce);
    stream.write_all(&own).await?;

    let mut accepted = [0u8; 1];
    stream.read_exact(&mut accepted).await?;
    let reason = read_reason(stream).await?;
    if accepted[0] == 1 {
        Ok(())
    } else {
        Err(HandshakeError::Rejected(format!(
            "it rejected this rank: {reason}"
        )))
    }
}

/// A reason: length u16, then UTF-8.
async fn read_reason(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut reason = vec![0u8; u16::from_le_bytes(len) as usize];
    stream.read_exact(&mut reason).await?;
    Ok(String::from_utf8_lossy(&reason).into_owned())
}

fn with_reason(mut message: Vec<u8>, reason: &str) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(u16::MAX as usize)];
    message.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    message.extend_from_slice(reason);
    message
}

/// How long a connection may take to complete its side of the handshake before it is dropped.
/// Handshakes run concurrently, so a silent or slow connection holds up no other rank (one
/// silent connection once stalled the whole mesh setup until the connect deadline).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts the ranks above `rank`. Connections that fail the handshake are answered with the
/// reason and dropped; the wait goes on for the right peers until the deadline.
async fn accept(
    listener: TcpListener,
    rank: usize,
    addrs: &[SocketAddr],
    after: Duration,
    secret: Arc<MeshSecret>,
    deadline: tokio::time::Instant,
) -> Result<Vec<(usize, TcpStream)>> {
    let world = addrs.len();
    let mut connected: Vec<(usize, TcpStream)> = Vec::with_capacity(world - rank - 1);
    let mut rejected: Option<String> = None;
    let mut handshakes = JoinSet::new();
    while connected.len() < world - rank - 1 {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((mut stream, from_addr)) => {
                    let _ = stream.set_nodelay(true);
                    let secret = secret.clone();
                    handshakes.spawn(async move {
                        let proven = tokio::time::timeout(
                            HELLO_TIMEOUT,
                            authenticate(&mut stream, rank, world, &secret),
                        )
                        .await
                        .unwrap_or_else(|_| {
                            Err(format!("did not complete the handshake within {HELLO_TIMEOUT:?}"))
                        });
                        (stream, from_addr, proven)
                    });
                }
                // e.g. out of file descriptors: wait a little rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(Ok((mut stream, from_addr, proven))) = handshakes.join_next() => {
                let verdict = proven.and_then(|from| {
                    if connected.iter().any(|(c, _)| *c == from) {
                        Err(format!("rank {from} is already connected"))
                    } else {
                        Ok(from)
                    }
                });
                let mut answer = vec![u8::from(verdict.is_ok())];
                answer = with_reason(answer, verdict.as_ref().err().map_or("", String::as_str));
                let sent = tokio::time::timeout(HELLO_TIMEOUT, stream.write_all(&answer)).await;
                match (verdict, sent) {
                    (Ok(from), Ok(Ok(()))) => connected.push((from, stream)),
                    (Ok(from), _) => {
                        rejected = Some(format!("rank {from} at {from_addr} did not take the handshake's answer"));
                    }
                    (Err(reason), _) => rejected = Some(format!("a connection from {from_addr}: {reason}")),
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let missing = (rank + 1..world)
                    .find(|r| connected.iter().all(|(c, _)| c != r))
                    .expect("a rank is missing");
                let mut reason = format!("it did not connect to {}", addrs[rank]);
                if let Some(rejected) = rejected {
                    reason.push_str(&format!(" (rejected: {rejected})"));
                }
                return Err(CommError::Connect {
                    rank,
                    peer: PeerId {
                        rank: missing,
                        addr: Some(addrs[missing]),
                    },
                    after,
                    reason,
                });
            }
        }
    }
    Ok(connected)
}

/// The acceptor's side of the handshake up to the verdict (see [`dial_handshake`]): reads the
/// hello, proves the mesh secret, checks the dialer's proof and the hello; returns the dialing
/// rank. A dialer is told why it was refused only once it has proven the secret.
async fn authenticate(
    stream: &mut TcpStream,
    rank: usize,
    world: usize,
    secret: &MeshSecret,
) -> std::result::Result<usize, String> {
    let mut received = [0u8; HELLO_BYTES + NONCE_BYTES];
    stream
        .read_exact(&mut received)
        .await
        .map_err(|e| format!("no complete handshake: {e}"))?;
    let (hello, dialer_nonce) = received.split_at(HELLO_BYTES);
    let dialer_nonce: [u8; NONCE_BYTES] = dialer_nonce.try_into().expect("nonce bytes");
    let u32_at = |at: usize| u32::from_le_bytes(hello[at..at + 4].try_into().expect("4 bytes"));
    if u32_at(0) != HELLO_MAGIC {
        return Err("not a longtake rank".to_string());
    }
    let version = u16::from_le_bytes([hello[4], hello[5]]);
    if version != PROTOCOL_VERSION {
        let reason = format!("protocol version {version}, this rank speaks {PROTOCOL_VERSION}");
        let mut refusal = ACK_MAGIC.to_le_bytes().to_vec();
        refusal.push(REFUSED);
        let _ = stream.write_all(&with_reason(refusal, &reason)).await;
        return Err(reason);
    }

    let acceptor_nonce = mesh_secret::nonce();
    let mut challenge = Vec::with_capacity(5 + NONCE_BYTES + PROOF_BYTES);
    challenge.extend_from_slice(&ACK_MAGIC.to_le_bytes());
    challenge.push(CHALLENGE);
    challenge.extend_from_slice(&acceptor_nonce);
    challenge.extend_from_slice(&secret.proof(
        Side::Acceptor,
        hello,
        &dialer_nonce,
        &acceptor_nonce,
    ));
    stream
        .write_all(&challenge)
        .await
        .map_err(|e| format!("sending the challenge: {e}"))?;
    let mut proof = [0u8; PROOF_BYTES];
    stream
        .read_exact(&mut proof)
        .await
        .map_err(|e| format!("no proof of the mesh secret: {e}"))?;
    if !secret.verify(Side::Dialer, hello, &dialer_nonce, &acceptor_nonce, &proof) {
        return Err("it does not hold this job's mesh secret".to_string());
    }

    let (their_world, from, to) = (u32_at(6) as usize, u32_at(10) as usize, u32_at(14) as usize);
    if their_world != world {
        Err(format!(
            "rank {from} has a world size of {their_world}, rank {rank} has {world}"
        ))
    } else if to != rank {
        Err(format!(
            "rank {from} dialed rank {to} but reached rank {rank}; the address lists differ"
        ))
    } else if from <= rank || from >= world {
        Err(format!(
            "rank {from} must not dial rank {rank} (ranks dial only lower ranks)"
        ))
    } else {
        Ok(from)
    }
}

impl Communicator for TcpMesh {
    fn rank(&self) -> usize {
        self.group_rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        comm::all_reduce_sum(self, tensor)
    }

    fn all_gather(&self, tensor: &Tensor, dim: usize) -> Result<Tensor> {
        comm::all_gather(self, tensor, dim)
    }

    fn all_to_all(&self, tensors: Vec<Tensor>) -> Result<Vec<Tensor>> {
        comm::all_to_all(self, tensors)
    }

    fn send(&self, tensor: &Tensor, to: usize) -> Result<()> {
        comm::send(self, tensor, to)
    }

    fn recv(&self, from: usize, device: &Device) -> Result<Tensor> {
        comm::recv(self, from, device)
    }

    fn broadcast(&self, tensor: Option<&Tensor>, root: usize, device: &Device) -> Result<Tensor> {
        comm::broadcast(self, tensor, root, device)
    }

    fn barrier(&self) -> Result<()> {
        comm::barrier(self)
    }

    fn subgroup(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>> {
        check_subgroup(self.mesh.rank, self.group_rank, self.members.len(), ranks)?;
        let nth = {
            let mut made = lock(&self.subgroups_made);
            let count = made.entry(ranks.to_vec()).or_insert(0);
            *count += 1;
            *count
        };
        let group = fnv1a(
            [self.group, ranks.len() as u64, nth]
                .into_iter()
                .chain(ranks.iter().map(|&r| r as u64)),
        );
        let members = ranks.iter().map(|&r| self.members[r]).collect();
        Ok(Box::new(Self::group(self.mesh.clone(), group, members)))
    }

    fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame header as a peer would send it: f32 (code 5), `shape`, claiming `payload_len`.
    fn header(shape: &[u64], payload_len: u64) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        h.extend_from_slice(&WORLD_GROUP.to_le_bytes());
        h.extend_from_slice(&0u64.to_le_bytes());
        h.extend_from_slice(&[0, 5, shape.len() as u8]);
        h.extend_from_slice(&payload_len.to_le_bytes());
        for d in shape {
            h.extend_from_slice(&d.to_le_bytes());
        }
        h
    }

    fn read(bytes: Vec<u8>) -> std::result::Result<Option<(u64, Frame)>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        rt.block_on(async { read_frame(&mut bytes.as_slice()).await })
    }

    fn refused(bytes: Vec<u8>) -> String {
        match read(bytes) {
            Err(e) => e,
            Ok(_) => panic!("the frame was read"),
        }
    }

    /// A hostile or broken peer cannot make the reader allocate what it does not send: a header
    /// claiming 2^40 bytes (a consistent shape) is refused before any allocation, and one under
    /// the limit whose bytes never come ends as an error when the connection does, having held
    /// only what arrived.
    #[test]
    fn a_frame_header_cannot_make_the_reader_allocate_what_is_not_sent() {
        let huge = 1u64 << 40;
        let err = refused(header(&[huge / 4], huge));
        assert!(err.contains("over the mesh's limit"), "{err}");

        let big = 8u64 << 30;
        let mut bytes = header(&[big / 4], big);
        bytes.extend_from_slice(&[0u8; 1000]);
        let err = refused(bytes);
        assert!(
            err.contains("ended 1000 bytes into a payload of 8589934592"),
            "{err}"
        );

        // a whole frame still reads
        let mut bytes = header(&[2], 8);
        bytes.extend_from_slice(&[1.0f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat());
        let (group, frame) = read(bytes).unwrap().expect("a frame");
        assert_eq!(group, WORLD_GROUP);
        assert_eq!(frame.message.shape, [2]);
    }
}
