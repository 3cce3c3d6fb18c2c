//! The `Communicator` trait (the collectives the parallel model code calls), its error type, the
//! wire form of a tensor, and the collective algorithms shared by backends that only know how to
//! move one message between two ranks.
//!
//! Contract (as with NCCL or MPI): every rank of a group calls the group's collectives in the
//! same order. Results live on the device of the input tensor (or the `device` argument where
//! a rank has no input).

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use half::slice::HalfFloatSliceExt;
use longtake_proto::telemetry::collective_span;

pub type Result<T> = std::result::Result<T, CommError>;

/// The collectives (and the point-to-point operations) of a [`Communicator`]. Messages carry the
/// operation that sent them, so ranks that call collectives in different orders get an error
/// instead of mixing up tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Connect,
    AllReduceSum,
    AllGather,
    AllToAll,
    Send,
    Recv,
    Broadcast,
    Barrier,
    Subgroup,
}

impl Op {
    /// The tag this operation's messages carry. A `recv` matches messages sent by `send`.
    pub(crate) fn wire_code(self) -> u8 {
        match self {
            Op::Connect => 0,
            Op::AllReduceSum => 1,
            Op::AllGather => 2,
            Op::AllToAll => 3,
            Op::Send | Op::Recv => 4,
            Op::Broadcast => 5,
            Op::Barrier => 6,
            Op::Subgroup => 7,
        }
    }

    pub(crate) fn from_wire_code(code: u8) -> Option<Op> {
        Some(match code {
            0 => Op::Connect,
            1 => Op::AllReduceSum,
            2 => Op::AllGather,
            3 => Op::AllToAll,
            4 => Op::Send,
            5 => Op::Broadcast,
            6 => Op::Barrier,
            7 => Op::Subgroup,
            _ => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Connect => "connect",
            Op::AllReduceSum => "all_reduce_sum",
            Op::AllGather => "all_gather",
            Op::AllToAll => "all_to_all",
            Op::Send => "send",
            Op::Recv => "recv",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
            Op::Subgroup => "subgroup",
        })
    }
}

/// A peer as errors name it: its global rank and, where known, its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerId {
    pub rank: usize,
    pub addr: Option<SocketAddr>,
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "rank {} ({addr})", self.rank),
            None => write!(f, "rank {}", self.rank),
        }
    }
}

/// Every message names this rank (global numbering), the peer where there is one, and the
/// operation, so that a failure in a job of many ranks can be traced from any one log line.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: {direction} {peer} in {op} timed out after {after:?}")]
    Timeout {
        rank: usize,
        /// "send to" or "recv from"
        direction: &'static str,
        peer: PeerId,
        op: Op,
        after: Duration,
    },
    #[error("rank {rank}: connection to {peer} lost in {op}: {reason}")]
    ConnectionLost {
        rank: usize,
        peer: PeerId,
        op: Op,
        reason: String,
    },
    #[error("rank {rank}: no connection with {peer} within {after:?}: {reason}")]
    Connect {
        rank: usize,
        peer: PeerId,
        after: Duration,
        reason: String,
    },
    #[error("rank {rank}: handshake with {peer} failed: {reason}")]
    Handshake {
        rank: usize,
        peer: PeerId,
        reason: String,
    },
    #[error("rank {rank}: cannot listen on {addr}: {source}")]
    Listen {
        rank: usize,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("rank {rank}: cannot start the communication runtime: {source}")]
    Runtime { rank: usize, source: std::io::Error },
    #[error("rank {rank}: {op} with {peer}: {reason}")]
    Protocol {
        rank: usize,
        peer: PeerId,
        op: Op,
        reason: String,
    },
    /// The caller passed arguments the operation cannot take (a rank out of range, a wrong
    /// number of tensors, ...).
    #[error("rank {rank}: {op}: {reason}")]
    Usage { rank: usize, op: Op, reason: String },
    /// A device-side backend (NCCL) reported an error, or did not finish an operation in time
    /// (`reason` names the call and the peer where there is one).
    #[error("rank {rank}: {op}: {reason}")]
    Backend { rank: usize, op: Op, reason: String },
    #[error("rank {rank}: {op}: {source}")]
    Tensor {
        rank: usize,
        op: Op,
        source: candle_core::Error,
    },
}

/// Lets model code that returns `candle_core::Result` use `?` on collectives.
impl From<CommError> for candle_core::Error {
    fn from(e: CommError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// Collectives over candle tensors (any dtype the wire form supports: f32, f16, bf16, f64, u8,
/// u32, i16, i32, i64), synchronous because the model stack is. Ranks are numbered 0..world_size
/// within this communicator; a subgroup renumbers its members 0..k.
pub trait Communicator: Send + Sync {
    /// This rank within this communicator.
    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// The element-wise sum of every rank's tensor (same shape and dtype on all ranks), added in
    /// rank order 0..n (in f32 for f16/bf16 inputs), so every rank gets bit-identical results.
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor>;

    /// The ranks' tensors concatenated in rank order along `dim` (their sizes along `dim` may
    /// differ; the other dimensions must agree).
    fn all_gather(&self, tensor: &Tensor, dim: usize) -> Result<Tensor>;

    /// `tensors[i]` goes to rank i; output `j` came from rank j. Needs exactly `world_size`
    /// tensors.
    fn all_to_all(&self, tensors: Vec<Tensor>) -> Result<Vec<Tensor>>;

    /// Sends `tensor` to rank `to` (not this rank); it returns once the message is on its way.
    fn send(&self, tensor: &Tensor, to: usize) -> Result<()>;

    /// The next tensor that rank `from` sent to this rank with `send`, placed on `device`.
    fn recv(&self, from: usize, device: &Device) -> Result<Tensor>;

    /// The root's tensor on every rank. The root passes `Some(tensor)` (its result is that
    /// tensor), the other ranks pass `None` and get the result on `device`.
    fn broadcast(&self, tensor: Option<&Tensor>, root: usize, device: &Device) -> Result<Tensor>;

    /// Returns once every rank of this communicator has entered the barrier.
    fn barrier(&self) -> Result<()>;

    /// A communicator over `ranks` (ranks of this communicator, strictly increasing, including
    /// this rank), numbered 0..k in that order. It shares this communicator's connections; its
    /// messages are tagged with their own group so they never mix with others. Every member
    /// calls `subgroup` with the same list, in the same order relative to its other `subgroup`
    /// calls on this communicator; non-members do not call it.
    fn subgroup(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>>;

    /// Bytes this communicator (not its subgroups) has written to the wire, headers included.
    fn bytes_sent(&self) -> u64;
}

/// Checks a subgroup's rank list against a communicator of `world_size` ranks in which the
/// caller is `me`, and returns the caller's rank in the subgroup.
pub(crate) fn check_subgroup(
    global_rank: usize,
    me: usize,
    world_size: usize,
    ranks: &[usize],
) -> Result<usize> {
    let usage = |reason: String| CommError::Usage {
        rank: global_rank,
        op: Op::Subgroup,
        reason,
    };
    if ranks.is_empty() {
        return Err(usage("the rank list is empty".into()));
    }
    if ranks.windows(2).any(|w| w[0] >= w[1]) {
        return Err(usage(format!(
            "ranks {ranks:?} are not strictly increasing"
        )));
    }
    if let Some(&bad) = ranks.iter().find(|&&r| r >= world_size) {
        return Err(usage(format!(
            "rank {bad} does not exist in a communicator of {world_size} ranks"
        )));
    }
    ranks.iter().position(|&r| r == me).ok_or_else(|| {
        usage(format!(
            "this rank ({me}) is not in {ranks:?}; only members create a subgroup"
        ))
    })
}

/// The element type of a tensor on the wire.
pub(crate) fn dtype_code(dtype: DType) -> Option<u8> {
    Some(match dtype {
        DType::U8 => 0,
        DType::U32 => 1,
        DType::I64 => 2,
        DType::BF16 => 3,
        DType::F16 => 4,
        DType::F32 => 5,
        DType::F64 => 6,
        DType::I16 => 7,
        DType::I32 => 8,
        _ => return None,
    })
}

pub(crate) fn dtype_from_code(code: u8) -> Option<DType> {
    Some(match code {
        0 => DType::U8,
        1 => DType::U32,
        2 => DType::I64,
        3 => DType::BF16,
        4 => DType::F16,
        5 => DType::F32,
        6 => DType::F64,
        7 => DType::I16,
        8 => DType::I32,
        _ => return None,
    })
}

/// A tensor's elements copied off its device once, in row-major order, kept in their own type so
/// that the bytes can be written without a second copy.
enum Elements {
    U8(Vec<u8>),
    U32(Vec<u32>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// A tensor in wire form: dtype code, shape, and the elements' bytes in the host byte order
/// (every supported target is little-endian; the handshake's magic numbers would not match
/// between hosts of different byte order).
pub(crate) struct Encoded {
    pub dtype: u8,
    pub shape: Vec<usize>,
    elements: Elements,
}

impl Encoded {
    pub fn new(tensor: &Tensor) -> candle_core::Result<Self> {
        let dtype = dtype_code(tensor.dtype()).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "tensors of dtype {:?} cannot be sent",
                tensor.dtype()
            ))
        })?;
        let flat = tensor.flatten_all()?;
        let elements = match tensor.dtype() {
            DType::U8 => Elements::U8(flat.to_vec1()?),
            DType::U32 => Elements::U32(flat.to_vec1()?),
            DType::I16 => Elements::I16(flat.to_vec1()?),
            DType::I32 => Elements::I32(flat.to_vec1()?),
            DType::I64 => Elements::I64(flat.to_vec1()?),
            DType::BF16 => Elements::Bf16(flat.to_vec1()?),
            DType::F16 => Elements::F16(flat.to_vec1()?),
            DType::F32 => Elements::F32(flat.to_vec1()?),
            DType::F64 => Elements::F64(flat.to_vec1()?),
            other => candle_core::bail!("tensors of dtype {other:?} cannot be sent"),
        };
        Ok(Self {
            dtype,
            shape: tensor.dims().to_vec(),
            elements,
        })
    }

    /// A message without a tensor (barrier tokens).
    pub fn empty() -> Self {
        Self {
            dtype: 0,
            shape: vec![0],
            elements: Elements::U8(Vec::new()),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.elements {
            Elements::U8(v) => v,
            Elements::U32(v) => bytemuck::cast_slice(v),
            Elements::I16(v) => bytemuck::cast_slice(v),
            Elements::I32(v) => bytemuck::cast_slice(v),
            Elements::I64(v) => bytemuck::cast_slice(v),
            Elements::Bf16(v) => bytemuck::cast_slice(v.reinterpret_cast()),
            Elements::F16(v) => bytemuck::cast_slice(v.reinterpret_cast()),
            Elements::F32(v) => bytemuck::cast_slice(v),
            Elements::F64(v) => bytemuck::cast_slice(v),
        }
    }
}

/// A message as it arrived: the wire form of one tensor.
pub(crate) struct Received {
    pub dtype: u8,
    pub shape: Vec<usize>,
    pub payload: Vec<u8>,
}

impl Received {
    pub fn into_tensor(self, device: &Device) -> candle_core::Result<Tensor> {
        let dtype = dtype_from_code(self.dtype).ok_or_else(|| {
            candle_core::Error::Msg(format!("unknown dtype code {} on the wire", self.dtype))
        })?;
        Tensor::from_raw_buffer(&self.payload, dtype, &self.shape, device)
    }
}

/// What a backend that moves single messages between the members of one group provides; the
/// collectives below are built on it. Ranks are group ranks.
pub(crate) trait PointToPoint {
    /// This rank in the global numbering, for error messages.
    fn global_rank(&self) -> usize;
    fn group_rank(&self) -> usize;
    fn group_size(&self) -> usize;
    fn op_timeout(&self) -> Duration;
    fn peer(&self, group_rank: usize) -> PeerId;
    fn send_message(&self, to: usize, op: Op, message: &Encoded) -> Result<()>;
    fn recv_message(&self, from: usize, op: Op, deadline: Instant) -> Result<Received>;
}

fn tensor_err<P: PointToPoint + ?Sized>(p: &P, op: Op) -> impl Fn(candle_core::Error) -> CommError {
    let rank = p.global_rank();
    move |source| CommError::Tensor { rank, op, source }
}

fn check_peer<P: PointToPoint + ?Sized>(p: &P, op: Op, peer: usize, what: &str) -> Result<()> {
    if peer >= p.group_size() || peer == p.group_rank() {
        return Err(CommError::Usage {
            rank: p.global_rank(),
            op,
            reason: format!(
                "{what} rank {peer} is not another rank of this communicator (rank {} of {})",
                p.group_rank(),
                p.group_size()
            ),
        });
    }
    Ok(())
}

/// Every rank's tensor, in rank order (this rank's own tensor at its index, untouched). Each
/// rank sends its tensor to every other; peers are visited starting after this rank so that no
/// rank is everybody's first target.
fn gather_all<P: PointToPoint + ?Sized>(p: &P, op: Op, tensor: &Tensor) -> Result<Vec<Tensor>> {
    let n = p.group_size();
    let me = p.group_rank();
    if n == 1 {
        return Ok(vec![tensor.clone()]);
    }
    let deadline = Instant::now() + p.op_timeout();
    let encoded = Encoded::new(tensor).map_err(tensor_err(p, op))?;
    for k in 1..n {
        p.send_message((me + k) % n, op, &encoded)?;
    }
    drop(encoded);
    let mut parts = Vec::with_capacity(n);
    for r in 0..n {
        if r == me {
            parts.push(tensor.clone());
        } else {
            let received = p.recv_message(r, op, deadline)?;
            parts.push(
                received
                    .into_tensor(tensor.device())
                    .map_err(tensor_err(p, op))?,
            );
        }
    }
    Ok(parts)
}

pub(crate) fn all_reduce_sum<P: PointToPoint + ?Sized>(p: &P, tensor: &Tensor) -> Result<Tensor> {
    let _span = collective_span("all_reduce", tensor_bytes(tensor)).entered();
    let op = Op::AllReduceSum;
    let parts = gather_all(p, op, tensor)?;
    for (r, part) in parts.iter().enumerate() {
        if part.dims() != tensor.dims() || part.dtype() != tensor.dtype() {
            return Err(CommError::Protocol {
                rank: p.global_rank(),
                peer: p.peer(r),
                op,
                reason: format!(
                    "it contributed a {:?} tensor of shape {:?}, this rank a {:?} tensor of shape {:?}",
                    part.dtype(),
                    part.dims(),
                    tensor.dtype(),
                    tensor.dims()
                ),
            });
        }
    }
    fold_in_rank_order(&parts).map_err(tensor_err(p, op))
}

/// The sum of `parts` added strictly in order, in f32 for half-precision inputs, so that every
/// rank computes the same bits.
pub(crate) fn fold_in_rank_order(parts: &[Tensor]) -> candle_core::Result<Tensor> {
    let Some(first) = parts.first() else {
        candle_core::bail!("nothing to sum");
    };
    let dtype = first.dtype();
    let acc_dtype = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    };
    let mut acc = first.to_dtype(acc_dtype)?;
    for part in &parts[1..] {
        acc = (acc + part.to_dtype(acc_dtype)?)?;
    }
    acc.to_dtype(dtype)
}

pub(crate) fn all_gather<P: PointToPoint + ?Sized>(
    p: &P,
    tensor: &Tensor,
    dim: usize,
) -> Result<Tensor> {
    let _span = collective_span("all_gather", tensor_bytes(tensor)).entered();
    let op = Op::AllGather;
    if dim >= tensor.rank() {
        return Err(CommError::Usage {
            rank: p.global_rank(),
            op,
            reason: format!(
                "dimension {dim} does not exist in a tensor of shape {:?}",
                tensor.dims()
            ),
        });
    }
    let parts = gather_all(p, op, tensor)?;
    if parts.len() == 1 {
        return Ok(tensor.clone());
    }
    Tensor::cat(&parts, dim).map_err(tensor_err(p, op))
}

pub(crate) fn all_to_all<P: PointToPoint + ?Sized>(
    p: &P,
    mut tensors: Vec<Tensor>,
) -> Result<Vec<Tensor>> {
    let bytes = tensors.iter().map(tensor_bytes).sum();
    let _span = collective_span("all_to_all", bytes).entered();
    let op = Op::AllToAll;
    let n = p.group_size();
    let me = p.group_rank();
    if tensors.len() != n {
        return Err(CommError::Usage {
            rank: p.global_rank(),
            op,
            reason: format!("got {} tensors for {n} ranks", tensors.len()),
        });
    }
    let deadline = Instant::now() + p.op_timeout();
    for k in 1..n {
        let to = (me + k) % n;
        let encoded = Encoded::new(&tensors[to]).map_err(tensor_err(p, op))?;
        p.send_message(to, op, &encoded)?;
    }
    let device = tensors[me].device().clone();
    for (from, slot) in tensors.iter_mut().enumerate() {
        if from != me {
            let received = p.recv_message(from, op, deadline)?;
            *slot = received.into_tensor(&device).map_err(tensor_err(p, op))?;
        }
    }
    Ok(tensors)
}

pub(crate) fn send<P: PointToPoint + ?Sized>(p: &P, tensor: &Tensor, to: usize) -> Result<()> {
    let _span = collective_span("send", tensor_bytes(tensor)).entered();
    check_peer(p, Op::Send, to, "destination")?;
    let encoded = Encoded::new(tensor).map_err(tensor_err(p, Op::Send))?;
    p.send_message(to, Op::Send, &encoded)
}

pub(crate) fn recv<P: PointToPoint + ?Sized>(
    p: &P,
    from: usize,
    device: &Device,
) -> Result<Tensor> {
    let _span = collective_span("recv", 0).entered();
    check_peer(p, Op::Recv, from, "source")?;
    let deadline = Instant::now() + p.op_timeout();
    p.recv_message(from, Op::Recv, deadline)?
        .into_tensor(device)
        .map_err(tensor_err(p, Op::Recv))
}

pub(crate) fn broadcast<P: PointToPoint + ?Sized>(
    p: &P,
    tensor: Option<&Tensor>,
    root: usize,
    device: &Device,
) -> Result<Tensor> {
    let _span = collective_span("broadcast", tensor.map_or(0, tensor_bytes)).entered();
    let op = Op::Broadcast;
    let n = p.group_size();
    let me = p.group_rank();
    let usage = |reason: String| CommError::Usage {
        rank: p.global_rank(),
        op,
        reason,
    };
    if root >= n {
        return Err(usage(format!(
            "root {root} is not a rank of this communicator of {n} ranks"
        )));
    }
    match (me == root, tensor) {
        (true, Some(tensor)) => {
            if n > 1 {
                let encoded = Encoded::new(tensor).map_err(tensor_err(p, op))?;
                for k in 1..n {
                    p.send_message((me + k) % n, op, &encoded)?;
                }
            }
            Ok(tensor.clone())
        }
        (false, None) => {
            let deadline = Instant::now() + p.op_timeout();
            p.recv_message(root, op, deadline)?
                .into_tensor(device)
                .map_err(tensor_err(p, op))
        }
        (true, None) => Err(usage("the root must pass its tensor".into())),
        (false, Some(_)) => Err(usage(format!(
            "only the root (rank {root}) passes a tensor; this is rank {me}"
        ))),
    }
}

pub(crate) fn barrier<P: PointToPoint + ?Sized>(p: &P) -> Result<()> {
    let _span = collective_span("barrier", 0).entered();
    let n = p.group_size();
    let me = p.group_rank();
    let deadline = Instant::now() + p.op_timeout();
    let token = Encoded::empty();
    for k in 1..n {
        p.send_message((me + k) % n, Op::Barrier, &token)?;
    }
    for from in (0..n).filter(|&r| r != me) {
        p.recv_message(from, Op::Barrier, deadline)?;
    }
    Ok(())
}

/// The bytes of a tensor's elements, as a collective span reports them.
fn tensor_bytes(tensor: &Tensor) -> usize {
    tensor.elem_count() * tensor.dtype().size_in_bytes()
}
