//! The NCCL communicator (feature `cuda`): the [`Communicator`] collectives on candle CUDA
//! tensors, one GPU per rank, through cudarc's raw NCCL bindings. The launcher creates an
//! [`NcclId`] on one rank and hands its bytes to the others (over the coordinator); every rank
//! then calls [`NcclCommunicator::new`] with its rank.
//!
//! Design notes:
//! - Every NCCL call is issued on the stream of the candle device the communicator was made for,
//!   and only tensors of that very device (same stream) are accepted, so plain stream order
//!   orders NCCL's reads and writes with candle's kernels, and cudarc's stream-ordered frees
//!   keep buffers alive until the operations that use them have run.
//! - Data moves as raw bytes (`ncclUint8`), so every candle dtype can be sent, gathered and
//!   broadcast; shapes that the receiver cannot know travel first in a small header.
//! - `all_reduce_sum` is NCCL's sum, not the rank-order fold of the TCP mesh: NCCL picks its
//!   algorithm (ring/tree, channel count) from the topology, and for a fixed topology (same
//!   world size, same GPUs and links, same NCCL version and environment) the reduction order,
//!   and so the result, is the same on every rank and every run. Results are bit-identical
//!   across runs of the same layout on the same machines, not across different layouts or
//!   backends. f16/bf16 inputs are summed in f32 (as the trait asks) and rounded back once.
//! - Time-outs: NCCL's blocking communicators give no deadline of their own; enqueued kernels
//!   wait for their peers forever. This communicator waits on the host by polling a CUDA event
//!   together with `ncclCommGetAsyncError`, and when `timeout` passes (or NCCL reports an
//!   asynchronous error such as a remote rank failing) it calls `ncclCommAbort`, which makes the
//!   stuck kernels return; the communicator is unusable afterwards and every later call fails.
//!   Only waits the communicator makes itself are bounded: header exchanges, `barrier`, and
//!   every operation when [`NcclConfig::synchronous`] is set. Otherwise results stay on the
//!   device stream without a host wait, and a hang shows up at the caller's next
//!   synchronisation (for instance `to_vec`), which NCCL cannot bound. Host calls that block
//!   inside NCCL have no time-out either: `ncclCommInitRank` (in [`NcclCommunicator::new`] and
//!   `subgroup`) until every rank has joined, and `ncclGroupEnd` while it sets up the
//!   connection to a peer on first use, which needs that peer to take part (a peer whose
//!   process died closes its sockets, which ends the wait with an error).
//! - As with any NCCL program, ranks that share GPUs between several communicators (parents and
//!   subgroups) must issue their operations in an order that cannot deadlock across them.
//! - Point-to-point: NCCL's send/recv are rendezvous operations (a send completes once the peer
//!   receives), unlike the TCP mesh where `send` returns once the message is on its way. To keep
//!   the common patterns deadlock-free (ring attention: every rank sends to its successor, then
//!   receives from its predecessor), `send` only queues the message; the next `recv` issues the
//!   queued sends (the oldest one to each peer) in one NCCL group with its own receive, and any
//!   collective first issues all queued sends. A queued send completes only when its receiver
//!   posts the matching receive, so a program is correct here if, whenever a rank receives or
//!   enters a collective with messages queued, their receivers post those receives without
//!   first waiting for that rank to do something else. Ring exchanges and send-then-receive
//!   pairs satisfy this; arbitrary buffered patterns that the TCP mesh tolerates may not.
//!   Because the send goes out with the receive, the ring's transfer no longer overlaps the
//!   attention computed between the two calls (a send on a second stream would restore that).

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::cuda::cudarc;
use candle_core::cuda::{CudaDevice, CudaStorageSlice};
use candle_core::{DType, Device, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::{result as nccl, sys};

use super::comm::{
    check_subgroup, dtype_code, dtype_from_code, CommError, Communicator, Op, PeerId, Result,
};
use super::single::SingleRank;

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

/// Most dimensions a tensor may have to travel with a header.
const MAX_DIMS: usize = 8;
/// Header: dtype code, number of dimensions, the dimensions (zero-filled), as i64.
const HEADER_LEN: usize = 2 + MAX_DIMS;

/// The rendezvous of one NCCL communicator: created on one rank, its bytes handed to all others.
#[derive(Clone, Copy)]
pub struct NcclId(sys::ncclUniqueId);

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`; it also opens the bootstrap socket the other ranks will
    /// dial, so create it on a rank that takes part).
    pub fn new() -> std::result::Result<Self, CommError> {
        nccl::get_uniqueid()
            .map(Self)
            .map_err(|e| CommError::Backend {
                rank: 0,
                op: Op::Connect,
                reason: format!("ncclGetUniqueId: {}", nccl_error(&e)),
            })
    }

    /// The bytes to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; NCCL_ID_BYTES] {
        self.0.internal.map(|c| c as u8)
    }

    /// The id whose [`to_bytes`](Self::to_bytes) were `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, CommError> {
        let bytes: &[u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| CommError::Usage {
            rank: 0,
            op: Op::Connect,
            reason: format!("an NCCL id has {NCCL_ID_BYTES} bytes, got {}", bytes.len()),
        })?;
        Ok(Self(sys::ncclUniqueId {
            internal: bytes.map(|b| b as std::ffi::c_char),
        }))
    }
}

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The bytes hold the bootstrap address; they are not worth printing.
        f.write_str("NcclId(..)")
    }
}

/// How an [`NcclCommunicator`] waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclConfig {
    /// Longest host wait for one operation before the communicator is aborted.
    pub timeout: Duration,
    /// Wait for every operation to complete on the device before returning (bounds every
    /// operation by `timeout`, at the cost of the overlap of communication with later work).
    pub synchronous: bool,
}

impl Default for NcclConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            synchronous: false,
        }
    }
}

/// An NCCL communicator handle. NCCL communicators may be used from any thread as long as calls
/// on one communicator are not concurrent; the `Mutex` around [`State`] serialises them.
struct RawComm(sys::ncclComm_t);

// SAFETY: the handle is only used while the owning `Mutex` is held (see `RawComm`).
unsafe impl Send for RawComm {}

/// A message `send` has queued: its header and its payload (contiguous, on this device).
struct Pending {
    to: usize,
    header: Tensor,
    payload: Tensor,
}

struct State {
    comm: RawComm,
    /// Set once the communicator was aborted (time-out or asynchronous error); why.
    aborted: Option<String>,
    pending: VecDeque<Pending>,
}

/// The [`Communicator`] of one rank, one GPU, over NCCL.
pub struct NcclCommunicator {
    state: Mutex<State>,
    device: Device,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    /// The global ranks of the members, for error messages (the identity for a top-level
    /// communicator).
    members: Vec<usize>,
    config: NcclConfig,
    bytes_sent: AtomicU64,
}

fn nccl_error(e: &nccl::NcclError) -> String {
    format!("{:?}", e.0)
}

impl NcclCommunicator {
    /// Joins the communicator `id` as `rank` of `world_size`, on the CUDA `device` (one GPU per
    /// rank). Blocks until all ranks have joined. The tensors passed to the collectives must be
    /// on this very `device` (not another candle `Device` of the same GPU, which has its own
    /// stream); results are on it too.
    pub fn new(
        id: &NcclId,
        rank: usize,
        world_size: usize,
        device: &Device,
        config: NcclConfig,
    ) -> Result<Self> {
        Self::with_members(
            id,
            rank,
            world_size,
            device,
            config,
            (0..world_size).collect(),
        )
    }

    fn with_members(
        id: &NcclId,
        rank: usize,
        world_size: usize,
        device: &Device,
        config: NcclConfig,
        members: Vec<usize>,
    ) -> Result<Self> {
        let global = members.get(rank).copied().unwrap_or(rank);
        let usage = |reason: String| CommError::Usage {
            rank: global,
            op: Op::Connect,
            reason,
        };
        if rank >= world_size {
            return Err(usage(format!(
                "rank {rank} does not exist in a communicator of {world_size} ranks"
            )));
        }
        let (Ok(n), Ok(r)) = (i32::try_from(world_size), i32::try_from(rank)) else {
            return Err(usage(format!("{world_size} ranks are too many for NCCL")));
        };
        let cuda = cuda_device(device).map_err(|source| CommError::Tensor {
            rank: global,
            op: Op::Connect,
            source,
        })?;
        let stream = cuda.cuda_stream();
        let backend = |reason: String| CommError::Backend {
            rank: global,
            op: Op::Connect,
            reason,
        };
        // ncclCommInitRank binds the communicator to the thread's current device.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| backend(format!("binding the CUDA context: {e:?}")))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out pointer; the id is passed by value.
        unsafe { nccl::comm_init_rank(&mut comm, n, id.0, r) }
            .map_err(|e| backend(format!("ncclCommInitRank: {}", nccl_error(&e))))?;
        Ok(Self {
            state: Mutex::new(State {
                comm: RawComm(comm),
                aborted: None,
                pending: VecDeque::new(),
            }),
            device: device.clone(),
            stream,
            rank,
            world_size,
            members,
            config,
            bytes_sent: AtomicU64::new(0),
        })
    }

    /// The device this communicator's tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn global_rank(&self) -> usize {
        self.members[self.rank]
    }

    fn peer(&self, rank: usize) -> PeerId {
        PeerId {
            rank: self.members.get(rank).copied().unwrap_or(rank),
            addr: None,
        }
    }

    fn lock(&self, op: Op) -> Result<MutexGuard<'_, State>> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(why) = &state.aborted {
            return Err(self.backend(op, format!("the communicator was aborted earlier: {why}")));
        }
        // NCCL and the CUDA calls around it act on the thread's current context; callers may
        // come from any thread.
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| self.backend(op, format!("binding the CUDA context: {e:?}")))?;
        Ok(state)
    }

    fn backend(&self, op: Op, reason: String) -> CommError {
        CommError::Backend {
            rank: self.global_rank(),
            op,
            reason,
        }
    }

    fn tensor_err(&self, op: Op) -> impl Fn(candle_core::Error) -> CommError {
        let rank = self.global_rank();
        move |source| CommError::Tensor { rank, op, source }
    }

    fn usage(&self, op: Op, reason: String) -> CommError {
        CommError::Usage {
            rank: self.global_rank(),
            op,
            reason,
        }
    }

    fn check_peer(&self, op: Op, peer: usize, what: &str) -> Result<()> {
        if peer >= self.world_size || peer == self.rank {
            return Err(self.usage(
                op,
                format!(
                    "{what} rank {peer} is not another rank of this communicator (rank {} of {})",
                    self.rank, self.world_size
                ),
            ));
        }
        Ok(())
    }

    /// `tensor`, contiguous and checked to live on this communicator's device (and stream).
    fn local(&self, op: Op, tensor: &Tensor) -> Result<Tensor> {
        self.check_device(op, tensor)?;
        tensor.contiguous().map_err(self.tensor_err(op))
    }

    /// Only tensors of this very candle device are accepted: another `Device` for the same GPU
    /// has its own stream, which the stream-order argument of the module notes does not cover.
    fn check_device(&self, op: Op, tensor: &Tensor) -> Result<()> {
        if !tensor.device().same_device(&self.device) {
            return Err(self.usage(
                op,
                format!(
                    "the tensor is on {:?}, this communicator works on {:?}",
                    tensor.device().location(),
                    self.device.location()
                ),
            ));
        }
        Ok(())
    }

    fn zeros(&self, op: Op, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::zeros(shape, dtype, &self.device).map_err(self.tensor_err(op))
    }

    fn header(&self, op: Op, tensor: &Tensor) -> Result<Tensor> {
        let dims = tensor.dims();
        let code = dtype_code(tensor.dtype()).ok_or_else(|| {
            self.usage(
                op,
                format!("tensors of dtype {:?} cannot be sent", tensor.dtype()),
            )
        })?;
        if dims.len() > MAX_DIMS {
            return Err(self.usage(
                op,
                format!("tensors of more than {MAX_DIMS} dimensions cannot be sent"),
            ));
        }
        let mut words = [0i64; HEADER_LEN];
        words[0] = i64::from(code);
        words[1] = dims.len() as i64;
        for (w, &d) in words[2..].iter_mut().zip(dims) {
            *w = d as i64;
        }
        Tensor::from_slice(&words, HEADER_LEN, &self.device).map_err(self.tensor_err(op))
    }

    /// Dtype and shape from a header that arrived from `from` (a group rank).
    fn parse_header(&self, op: Op, words: &[i64], from: usize) -> Result<(DType, Vec<usize>)> {
        let bad = |reason: String| CommError::Protocol {
            rank: self.global_rank(),
            peer: self.peer(from),
            op,
            reason,
        };
        let dtype = u8::try_from(words[0])
            .ok()
            .and_then(dtype_from_code)
            .ok_or_else(|| bad(format!("unknown dtype code {} in a header", words[0])))?;
        let ndims = usize::try_from(words[1])
            .ok()
            .filter(|&n| n <= MAX_DIMS)
            .ok_or_else(|| bad(format!("{} dimensions in a header", words[1])))?;
        let dims = words[2..2 + ndims]
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| bad(format!("dimension {d} in a header"))))
            .collect::<Result<Vec<_>>>()?;
        Ok((dtype, dims))
    }

    fn read_words(&self, op: Op, t: &Tensor) -> Result<Vec<i64>> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<i64>())
            .map_err(self.tensor_err(op))
    }

    fn count_sent(&self, bytes: usize) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Runs `calls` between `ncclGroupStart` and `ncclGroupEnd`.
    fn group(
        &self,
        state: &mut State,
        op: Op,
        calls: impl FnOnce(&mut State) -> Result<()>,
    ) -> Result<()> {
        nccl::group_start()
            .map_err(|e| self.backend(op, format!("ncclGroupStart: {}", nccl_error(&e))))?;
        let issued = calls(state);
        // The group must be closed even when a call failed, or the thread's NCCL state leaks
        // into the next operation.
        let ended = nccl::group_end();
        issued?;
        ended.map_err(|e| self.fail(state, op, format!("ncclGroupEnd: {}", nccl_error(&e))))?;
        Ok(())
    }

    /// Aborts the communicator after an NCCL failure and returns the error for `reason`.
    fn fail(&self, state: &mut State, op: Op, reason: String) -> CommError {
        if state.aborted.is_none() {
            // SAFETY: the handle is valid until aborted, which happens only here and in Drop.
            let _ = unsafe { nccl::comm_abort(state.comm.0) };
            state.aborted = Some(reason.clone());
        }
        self.backend(op, reason)
    }

    /// Waits until the work enqueued so far on the stream has completed, at most `timeout`;
    /// on a time-out or an asynchronous NCCL error the communicator is aborted.
    /// `peer` names who is waited for in errors (a point-to-point peer, or none).
    fn wait(&self, state: &mut State, op: Op, peer: Option<usize>) -> Result<()> {
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| self.fail(state, op, format!("recording a CUDA event: {e:?}")))?;
        let start = Instant::now();
        let mut nap = Duration::from_micros(10);
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.fail(state, op, format!("CUDA error: {e:?}"))),
            }
            let mut status = sys::ncclResult_t::ncclSuccess;
            // SAFETY: valid handle (not aborted, checked by `lock`), valid out pointer.
            let _ = unsafe { sys::ncclCommGetAsyncError(state.comm.0, &mut status) };
            if status != sys::ncclResult_t::ncclSuccess {
                let with = peer.map(|p| format!(" (waiting for {})", self.peer(p)));
                return Err(self.fail(
                    state,
                    op,
                    format!(
                        "NCCL asynchronous error {status:?}{}",
                        with.unwrap_or_default()
                    ),
                ));
            }
            if start.elapsed() >= self.config.timeout {
                let who = match peer {
                    Some(p) => format!("{}", self.peer(p)),
                    None => "the other ranks".to_string(),
                };
                return Err(self.fail(
                    state,
                    op,
                    format!(
                        "timed out after {:?} waiting for {who}; the communicator was aborted",
                        self.config.timeout
                    ),
                ));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    }

    /// Waits only if the configuration asks every operation to complete before returning.
    fn settle(&self, state: &mut State, op: Op, peer: Option<usize>) -> Result<()> {
        if self.config.synchronous {
            self.wait(state, op, peer)
        } else {
            Ok(())
        }
    }

    fn nccl_send(&self, state: &State, op: Op, t: &Tensor, to: usize) -> Result<()> {
        let (ptr, bytes) = device_ptr(t, &self.stream).map_err(self.tensor_err(op))?;
        // SAFETY: `ptr` addresses `bytes` bytes of a live buffer on this communicator's stream.
        unsafe {
            nccl::send(
                ptr as *const c_void,
                bytes,
                sys::ncclDataType_t::ncclUint8,
                to as i32,
                state.comm.0,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(|e| {
            self.backend(
                op,
                format!("ncclSend to {}: {}", self.peer(to), nccl_error(&e)),
            )
        })?;
        Ok(())
    }

    /// Receives into `t`, a tensor this communicator has just allocated (nothing else refers
    /// to its storage, so writing through the read guard's pointer is not observed by anyone).
    fn nccl_recv(&self, state: &State, op: Op, t: &Tensor, from: usize) -> Result<()> {
        let (ptr, bytes) = device_ptr(t, &self.stream).map_err(self.tensor_err(op))?;
        // SAFETY: as in `nccl_send`; the buffer is exclusively ours (see above).
        unsafe {
            nccl::recv(
                ptr as *mut c_void,
                bytes,
                sys::ncclDataType_t::ncclUint8,
                from as i32,
                state.comm.0,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(|e| {
            self.backend(
                op,
                format!("ncclRecv from {}: {}", self.peer(from), nccl_error(&e)),
            )
        })?;
        Ok(())
    }

    /// Issues every queued send, oldest first, each header before its payload.
    fn flush(&self, state: &mut State, op: Op) -> Result<()> {
        while let Some(p) = state.pending.pop_front() {
            self.group(state, op, |s| self.nccl_send(s, Op::Send, &p.header, p.to))?;
            self.group(state, op, |s| self.nccl_send(s, Op::Send, &p.payload, p.to))?;
        }
        Ok(())
    }

    /// Tensors whose sizes along `dim` differ: every rank's header, in rank order.
    fn gather_headers(&self, state: &mut State, op: Op, tensor: &Tensor) -> Result<Vec<i64>> {
        let header = self.header(op, tensor)?;
        let all = self.zeros(op, &[self.world_size * HEADER_LEN], DType::I64)?;
        let (src, bytes) = device_ptr(&header, &self.stream).map_err(self.tensor_err(op))?;
        let (dst, _) = device_ptr(&all, &self.stream).map_err(self.tensor_err(op))?;
        // SAFETY: both buffers are live on this stream; `all` is ours alone and holds
        // world_size headers.
        unsafe {
            nccl::all_gather(
                src as *const c_void,
                dst as *mut c_void,
                bytes,
                sys::ncclDataType_t::ncclUint8,
                state.comm.0,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(|e| self.fail(state, op, format!("ncclAllGather: {}", nccl_error(&e))))?;
        self.wait(state, op, None)?;
        self.read_words(op, &all)
    }

    /// NCCL's all-gather (equal sizes) of `t` along dim 0 into a new tensor.
    fn all_gather_dim0(&self, state: &mut State, op: Op, t: &Tensor) -> Result<Tensor> {
        let mut dims = t.dims().to_vec();
        dims[0] *= self.world_size;
        let out = self.zeros(op, &dims, t.dtype())?;
        let (src, bytes) = device_ptr(t, &self.stream).map_err(self.tensor_err(op))?;
        let (dst, _) = device_ptr(&out, &self.stream).map_err(self.tensor_err(op))?;
        // SAFETY: as in `gather_headers`.
        unsafe {
            nccl::all_gather(
                src as *const c_void,
                dst as *mut c_void,
                bytes,
                sys::ncclDataType_t::ncclUint8,
                state.comm.0,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(|e| self.fail(state, op, format!("ncclAllGather: {}", nccl_error(&e))))?;
        self.count_sent(bytes * (self.world_size - 1));
        self.settle(state, op, None)?;
        Ok(out)
    }
}

/// The CUDA device behind `device`.
fn cuda_device(device: &Device) -> candle_core::Result<&CudaDevice> {
    device.as_cuda_device()
}

/// The device address and byte length of a contiguous CUDA tensor's elements.
///
/// The guard cudarc returns (which records the buffer's use on `stream` for other streams) is
/// dropped at once: all buffers here live on the communicator's own stream, so the recorded
/// event is never waited on by anything the ordering of that stream does not already cover.
fn device_ptr(t: &Tensor, stream: &Arc<CudaStream>) -> candle_core::Result<(u64, usize)> {
    fn raw<T>(s: &CudaSlice<T>, start: usize, n: usize, stream: &Arc<CudaStream>) -> (u64, usize) {
        let view = s.slice(start..start + n);
        let (ptr, _record) = view.device_ptr(stream);
        (ptr, n * std::mem::size_of::<T>())
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        candle_core::bail!("the tensor is not on a CUDA device");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("the tensor is not contiguous");
    };
    let n = end - start;
    Ok(match &cuda.slice {
        CudaStorageSlice::U8(s) => raw(s, start, n, stream),
        CudaStorageSlice::U32(s) => raw(s, start, n, stream),
        CudaStorageSlice::I16(s) => raw(s, start, n, stream),
        CudaStorageSlice::I32(s) => raw(s, start, n, stream),
        CudaStorageSlice::I64(s) => raw(s, start, n, stream),
        CudaStorageSlice::BF16(s) => raw(s, start, n, stream),
        CudaStorageSlice::F16(s) => raw(s, start, n, stream),
        CudaStorageSlice::F32(s) => raw(s, start, n, stream),
        CudaStorageSlice::F64(s) => raw(s, start, n, stream),
        _ => candle_core::bail!("tensors of dtype {:?} cannot be sent", t.dtype()),
    })
}

/// NCCL's element type for a sum over `dtype` (half types are summed as f32 by the caller).
fn sum_type(dtype: DType) -> Option<sys::ncclDataType_t> {
    use sys::ncclDataType_t as T;
    Some(match dtype {
        DType::U8 => T::ncclUint8,
        DType::U32 => T::ncclUint32,
        DType::I32 => T::ncclInt32,
        DType::I64 => T::ncclInt64,
        DType::F32 => T::ncclFloat32,
        DType::F64 => T::ncclFloat64,
        _ => return None,
    })
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let op = Op::AllReduceSum;
        let input = self.local(op, tensor)?;
        let acc_dtype = match tensor.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            other => other,
        };
        let Some(nccl_type) = sum_type(acc_dtype) else {
            return Err(self.usage(
                op,
                format!("NCCL cannot sum tensors of dtype {:?}", tensor.dtype()),
            ));
        };
        let mut state = self.lock(op)?;
        self.flush(&mut state, op)?;
        if self.world_size == 1 {
            return Ok(tensor.clone());
        }
        let input = input.to_dtype(acc_dtype).map_err(self.tensor_err(op))?;
        let out = self.zeros(op, input.dims(), acc_dtype)?;
        let (src, bytes) = device_ptr(&input, &self.stream).map_err(self.tensor_err(op))?;
        let (dst, _) = device_ptr(&out, &self.stream).map_err(self.tensor_err(op))?;
        // SAFETY: both buffers are live on this stream and hold elem_count elements of
        // `nccl_type`; `out` is ours alone.
        unsafe {
            nccl::all_reduce(
                src as *const c_void,
                dst as *mut c_void,
                input.elem_count(),
                nccl_type,
                sys::ncclRedOp_t::ncclSum,
                state.comm.0,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(|e| self.fail(&mut state, op, format!("ncclAllReduce: {}", nccl_error(&e))))?;
        // What any all-reduce must move per rank (the ring's volume): 2 (n-1)/n of the buffer.
        self.count_sent(2 * bytes * (self.world_size - 1) / self.world_size);
        self.settle(&mut state, op, None)?;
        drop(state);
        out.to_dtype(tensor.dtype()).map_err(self.tensor_err(op))
    }

    fn all_gather(&self, tensor: &Tensor, dim: usize) -> Result<Tensor> {
        let op = Op::AllGather;
        if dim >= tensor.rank() {
            return Err(self.usage(
                op,
                format!(
                    "dimension {dim} does not exist in a tensor of shape {:?}",
                    tensor.dims()
                ),
            ));
        }
        self.check_device(op, tensor)?;
        let mut state = self.lock(op)?;
        self.flush(&mut state, op)?;
        if self.world_size == 1 {
            return Ok(tensor.clone());
        }
        // Sizes along `dim` may differ between ranks: learn them (and check the rest agrees).
        let words = self.gather_headers(&mut state, op, tensor)?;
        let mut sizes = Vec::with_capacity(self.world_size);
        for (r, header) in words.chunks(HEADER_LEN).enumerate() {
            let (dtype, dims) = self.parse_header(op, header, r)?;
            let mut other = dims.clone();
            let mut mine = tensor.dims().to_vec();
            if dims.len() == mine.len() {
                other[dim] = 0;
                mine[dim] = 0;
            }
            if dtype != tensor.dtype() || other != mine {
                return Err(CommError::Protocol {
                    rank: self.global_rank(),
                    peer: self.peer(r),
                    op,
                    reason: format!(
                        "it contributed a {dtype:?} tensor of shape {dims:?}, this rank a {:?} \
                         tensor of shape {:?} (gathered along dimension {dim})",
                        tensor.dtype(),
                        tensor.dims()
                    ),
                });
            }
            sizes.push(dims[dim]);
        }
        let longest = sizes.iter().copied().max().unwrap_or(0);
        let tensor_err = self.tensor_err(op);
        // NCCL gathers equal-sized contiguous buffers one after the other, i.e. along dim 0:
        // bring `dim` to the front and pad every part to the longest.
        let front = tensor
            .transpose(0, dim)
            .and_then(|t| t.pad_with_zeros(0, 0, longest - tensor.dim(dim)?))
            .and_then(|t| t.contiguous())
            .map_err(&tensor_err)?;
        let gathered = self.all_gather_dim0(&mut state, op, &front)?;
        drop(state);
        let result = if sizes.iter().all(|&s| s == longest) {
            gathered
        } else {
            let parts = sizes
                .iter()
                .enumerate()
                .map(|(r, &s)| gathered.narrow(0, r * longest, s))
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(&tensor_err)?;
            Tensor::cat(&parts, 0).map_err(&tensor_err)?
        };
        if dim == 0 {
            Ok(result)
        } else {
            result
                .transpose(0, dim)
                .and_then(|t| t.contiguous())
                .map_err(tensor_err)
        }
    }

    fn all_to_all(&self, tensors: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let op = Op::AllToAll;
        let n = self.world_size;
        let me = self.rank;
        if tensors.len() != n {
            return Err(self.usage(op, format!("got {} tensors for {n} ranks", tensors.len())));
        }
        let outgoing = tensors
            .iter()
            .map(|t| self.local(op, t))
            .collect::<Result<Vec<_>>>()?;
        let headers = outgoing
            .iter()
            .map(|t| self.header(op, t))
            .collect::<Result<Vec<_>>>()?;
        let mut state = self.lock(op)?;
        self.flush(&mut state, op)?;
        if n == 1 {
            return Ok(tensors);
        }
        let peers: Vec<usize> = (1..n).map(|k| (me + k) % n).collect();
        let incoming_headers = peers
            .iter()
            .map(|_| self.zeros(op, &[HEADER_LEN], DType::I64))
            .collect::<Result<Vec<_>>>()?;
        self.group(&mut state, op, |s| {
            for (&p, h) in peers.iter().zip(&incoming_headers) {
                self.nccl_send(s, op, &headers[p], p)?;
                self.nccl_recv(s, op, h, p)?;
            }
            Ok(())
        })?;
        self.wait(&mut state, op, None)?;
        let mut incoming = Vec::with_capacity(peers.len());
        for (&p, h) in peers.iter().zip(&incoming_headers) {
            let (dtype, dims) = self.parse_header(op, &self.read_words(op, h)?, p)?;
            incoming.push(self.zeros(op, &dims, dtype)?);
        }
        self.group(&mut state, op, |s| {
            for (&p, t) in peers.iter().zip(&incoming) {
                self.nccl_send(s, op, &outgoing[p], p)?;
                self.nccl_recv(s, op, t, p)?;
            }
            Ok(())
        })?;
        let sent: usize = peers
            .iter()
            .map(|&p| outgoing[p].elem_count() * outgoing[p].dtype().size_in_bytes())
            .sum();
        self.count_sent(sent + peers.len() * HEADER_LEN * 8);
        self.settle(&mut state, op, None)?;
        drop(state);
        let mut result = tensors;
        for (p, t) in peers.into_iter().zip(incoming) {
            result[p] = t;
        }
        Ok(result)
    }

    fn send(&self, tensor: &Tensor, to: usize) -> Result<()> {
        let op = Op::Send;
        self.check_peer(op, to, "destination")?;
        let payload = self.local(op, tensor)?;
        let header = self.header(op, &payload)?;
        let mut state = self.lock(op)?;
        self.count_sent(HEADER_LEN * 8 + payload.elem_count() * payload.dtype().size_in_bytes());
        state.pending.push_back(Pending {
            to,
            header,
            payload,
        });
        Ok(())
    }

    fn recv(&self, from: usize, device: &Device) -> Result<Tensor> {
        let op = Op::Recv;
        self.check_peer(op, from, "source")?;
        let mut state = self.lock(op)?;
        // The oldest queued message to each peer goes out with this receive (see the module
        // notes); later ones to the same peer wait for the next round.
        let mut batch = Vec::new();
        let mut rest = VecDeque::new();
        while let Some(p) = state.pending.pop_front() {
            if batch.iter().any(|b: &Pending| b.to == p.to) {
                rest.push_back(p);
            } else {
                batch.push(p);
            }
        }
        state.pending = rest;
        let header = self.zeros(op, &[HEADER_LEN], DType::I64)?;
        self.group(&mut state, op, |s| {
            for p in &batch {
                self.nccl_send(s, Op::Send, &p.header, p.to)?;
            }
            self.nccl_recv(s, op, &header, from)
        })?;
        self.wait(&mut state, op, Some(from))?;
        let (dtype, dims) = self.parse_header(op, &self.read_words(op, &header)?, from)?;
        let out = self.zeros(op, &dims, dtype)?;
        self.group(&mut state, op, |s| {
            for p in &batch {
                self.nccl_send(s, Op::Send, &p.payload, p.to)?;
            }
            self.nccl_recv(s, op, &out, from)
        })?;
        self.settle(&mut state, op, Some(from))?;
        drop(state);
        if device.same_device(&self.device) {
            Ok(out)
        } else {
            out.to_device(device).map_err(self.tensor_err(op))
        }
    }

    fn broadcast(&self, tensor: Option<&Tensor>, root: usize, device: &Device) -> Result<Tensor> {
        let op = Op::Broadcast;
        let n = self.world_size;
        if root >= n {
            return Err(self.usage(
                op,
                format!("root {root} is not a rank of this communicator of {n} ranks"),
            ));
        }
        let mine = match (self.rank == root, tensor) {
            (true, Some(t)) => Some(self.local(op, t)?),
            (false, None) => None,
            (true, None) => return Err(self.usage(op, "the root must pass its tensor".into())),
            (false, Some(_)) => {
                return Err(self.usage(
                    op,
                    format!(
                        "only the root (rank {root}) passes a tensor; this is rank {}",
                        self.rank
                    ),
                ))
            }
        };
        let mut state = self.lock(op)?;
        self.flush(&mut state, op)?;
        if n == 1 {
            return tensor
                .cloned()
                .ok_or_else(|| self.usage(op, "the root must pass its tensor".into()));
        }
        let header = match &mine {
            Some(t) => self.header(op, t)?,
            None => self.zeros(op, &[HEADER_LEN], DType::I64)?,
        };
        self.nccl_broadcast(&mut state, op, &header, root)?;
        let out = match mine {
            Some(t) => t,
            None => {
                self.wait(&mut state, op, Some(root))?;
                let (dtype, dims) = self.parse_header(op, &self.read_words(op, &header)?, root)?;
                self.zeros(op, &dims, dtype)?
            }
        };
        let bytes = self.nccl_broadcast(&mut state, op, &out, root)?;
        if self.rank == root {
            self.count_sent((bytes + HEADER_LEN * 8) * (n - 1));
        }
        self.settle(&mut state, op, Some(root))?;
        drop(state);
        match tensor {
            Some(t) => Ok(t.clone()),
            None if device.same_device(&self.device) => Ok(out),
            None => out.to_device(device).map_err(self.tensor_err(op)),
        }
    }

    fn barrier(&self) -> Result<()> {
        let op = Op::Barrier;
        let mut state = self.lock(op)?;
        self.flush(&mut state, op)?;
        if self.world_size == 1 {
            return Ok(());
        }
        let token = self.zeros(op, &[1], DType::F32)?;
        let (ptr, _) = device_ptr(&token, &self.stream).map_err(self.tensor_err(op))?;
        // SAFETY: a live one-element buffer of ours, reduced in place.
        unsafe {
            nccl::all_reduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                1,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                state.comm.0,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(|e| self.fail(&mut state, op, format!("ncclAllReduce: {}", nccl_error(&e))))?;
        self.count_sent(4);
        self.wait(&mut state, op, None)
    }

    fn subgroup(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>> {
        let op = Op::Subgroup;
        let me = check_subgroup(self.global_rank(), self.rank, self.world_size, ranks)?;
        let members: Vec<usize> = ranks.iter().map(|&r| self.members[r]).collect();
        if ranks.len() == 1 {
            return Ok(Box::new(SingleRank::new()));
        }
        // cudarc exposes no ncclCommSplit for every CUDA version it builds against (and a split
        // is collective over the whole parent, while only members call `subgroup`): the first
        // member makes a fresh id and sends its bytes to the other members point-to-point.
        let leader = ranks[0];
        let mut state = self.lock(op)?;
        self.flush(&mut state, op)?;
        let id = if me == 0 {
            let id = NcclId::new()?;
            let bytes = Tensor::from_slice(&id.to_bytes(), NCCL_ID_BYTES, &self.device)
                .map_err(self.tensor_err(op))?;
            self.group(&mut state, op, |s| {
                for &r in &ranks[1..] {
                    self.nccl_send(s, op, &bytes, r)?;
                }
                Ok(())
            })?;
            self.count_sent(NCCL_ID_BYTES * (ranks.len() - 1));
            self.wait(&mut state, op, None)?;
            id
        } else {
            let bytes = self.zeros(op, &[NCCL_ID_BYTES], DType::U8)?;
            self.group(&mut state, op, |s| self.nccl_recv(s, op, &bytes, leader))?;
            self.wait(&mut state, op, Some(leader))?;
            let bytes = bytes.to_vec1::<u8>().map_err(self.tensor_err(op))?;
            NcclId::from_bytes(&bytes)?
        };
        drop(state);
        let sub = Self::with_members(
            &id,
            me,
            ranks.len(),
            &self.device,
            self.config.clone(),
            members,
        )?;
        Ok(Box::new(sub))
    }

    /// Bytes this rank handed to NCCL for other ranks: point-to-point payloads and headers
    /// exactly, collectives by their algorithm-independent volume (all-reduce 2(n-1)/n of the
    /// buffer, all-gather and broadcast the buffer once per receiving rank). NCCL does not
    /// report what it actually put on the links.
    fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }
}

impl NcclCommunicator {
    /// `ncclBroadcast` of `t` from `root`, in place (the root's own buffer is only read).
    /// Returns the bytes broadcast.
    fn nccl_broadcast(&self, state: &mut State, op: Op, t: &Tensor, root: usize) -> Result<usize> {
        let (ptr, bytes) = device_ptr(t, &self.stream).map_err(self.tensor_err(op))?;
        // SAFETY: a live buffer on this stream; on the root sendbuff == recvbuff, which NCCL
        // treats as in place (no write); elsewhere the buffer was allocated for this call.
        unsafe {
            nccl::broadcast(
                ptr as *const c_void,
                ptr as *mut c_void,
                bytes,
                sys::ncclDataType_t::ncclUint8,
                root as i32,
                state.comm.0,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(|e| {
            self.fail(
                state,
                op,
                format!("ncclBroadcast from {}: {}", self.peer(root), nccl_error(&e)),
            )
        })?;
        Ok(bytes)
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        let state = self
            .state
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.aborted.is_some() {
            return;
        }
        if !state.pending.is_empty() {
            tracing::warn!(
                rank = self.members[self.rank],
                count = state.pending.len(),
                "NCCL communicator dropped with queued sends that no receive collected"
            );
        }
        // Let enqueued operations finish before the communicator goes; if they cannot (a peer
        // is gone), abort, which makes them return.
        let comm = state.comm.0;
        let finished = self
            .stream
            .record_event(None)
            .map(|event| {
                let start = Instant::now();
                while !event.is_complete() {
                    if start.elapsed() >= self.config.timeout {
                        return false;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                true
            })
            .unwrap_or(false);
        // SAFETY: the handle is valid (not aborted) and used by nobody else any more.
        unsafe {
            if finished {
                let _ = nccl::comm_destroy(comm);
            } else {
                let _ = nccl::comm_abort(comm);
            }
        }
    }
}

// Compiled only with the `cuda` feature, which CI never builds. This is the one place where a
// test skips instead of failing: without two GPUs there is nothing to run the ranks on.
#[cfg(test)]
mod tests {
    use super::*;

    type TestError = Box<dyn std::error::Error + Send + Sync>;
    type TestResult<T = ()> = std::result::Result<T, TestError>;

    fn gpus() -> usize {
        cudarc::driver::CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .unwrap_or(0)
    }

    /// Hang guard: far beyond every time-out these tests set; no test checks how long
    /// something took.
    const HANG_GUARD: Duration = Duration::from_secs(60);

    /// Whether the run says it is CPU-only (`LONGTAKE_CPU_ONLY=1`): only then may a test of this
    /// `cuda` build pass without the GPUs it needs.
    fn cpu_only() -> bool {
        std::env::var("LONGTAKE_CPU_ONLY").is_ok_and(|v| v == "1")
    }

    /// Too few GPUs: an error (the `cuda` feature is on, so the NCCL tests are expected to run),
    /// unless `LONGTAKE_CPU_ONLY=1` says this run is CPU-only.
    fn missing_gpus(n: usize, found: usize) -> TestResult {
        if cpu_only() {
            eprintln!("not run: {n} GPUs needed, {found} found; LONGTAKE_CPU_ONLY=1 says the run is CPU-only");
            Ok(())
        } else {
            Err(format!(
                "{n} GPUs needed, {found} found: the NCCL tests of a `cuda` build need them \
                 (set LONGTAKE_CPU_ONLY=1 to say the run is CPU-only)"
            )
            .into())
        }
    }

    /// Runs `body` on `n` ranks (threads, GPU r for rank r) and returns their results in rank
    /// order; with fewer than `n` GPUs, an error, or `None` when the run is CPU-only
    /// ([`missing_gpus`]).
    fn on_ranks<T: Send>(
        n: usize,
        config: NcclConfig,
        body: impl Fn(&NcclCommunicator) -> TestResult<T> + Sync,
    ) -> TestResult<Option<Vec<T>>> {
        let found = gpus();
        if found < n {
            missing_gpus(n, found)?;
            return Ok(None);
        }
        let id = NcclId::new()?.to_bytes();
        let body = &body;
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|r| {
                    let config = config.clone();
                    s.spawn(move || -> TestResult<T> {
                        let id = NcclId::from_bytes(&id)?;
                        let device = Device::new_cuda(r)?;
                        let comm = NcclCommunicator::new(&id, r, n, &device, config)?;
                        body(&comm)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("a rank panicked".into())))
                .collect::<Vec<_>>()
        });
        Ok(Some(results.into_iter().collect::<TestResult<Vec<T>>>()?))
    }

    fn config() -> NcclConfig {
        NcclConfig {
            timeout: Duration::from_secs(30),
            synchronous: true,
        }
    }

    /// Rank r's test tensor, on the CPU: distinct small integers, exact in every float type.
    fn contribution(r: usize, dims: &[usize], dtype: DType) -> candle_core::Result<Tensor> {
        let n: usize = dims.iter().product();
        Tensor::arange(0f32, n as f32, &Device::Cpu)?
            .affine(1.0, 100.0 * r as f64)?
            .reshape(dims)?
            .to_dtype(dtype)
    }

    fn f32_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()
    }

    #[test]
    fn nccl_id_bytes_round_trip() -> TestResult {
        assert!(NcclId::from_bytes(&[0u8; 12]).is_err());
        if gpus() == 0 {
            // ncclGetUniqueId needs the CUDA driver.
            return missing_gpus(1, 0);
        }
        let id = NcclId::new()?;
        assert_eq!(
            NcclId::from_bytes(&id.to_bytes())?.to_bytes(),
            id.to_bytes()
        );
        Ok(())
    }

    #[test]
    fn all_reduce_sum_is_the_sum_and_identical_on_every_rank() -> TestResult {
        let n = 2;
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::I64] {
            let Some(results) = on_ranks(n, config(), |comm| {
                let mine = contribution(comm.rank(), &[3, 5], dtype)?.to_device(comm.device())?;
                let sum = comm.all_reduce_sum(&mine)?;
                assert_eq!((sum.dims(), sum.dtype()), (mine.dims(), dtype));
                Ok(f32_values(&sum)?)
            })?
            else {
                return Ok(());
            };
            let parts = (0..n)
                .map(|r| contribution(r, &[3, 5], dtype))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let want = f32_values(&crate::parallel::comm::fold_in_rank_order(&parts)?)?;
            for got in &results {
                assert_eq!(got, &want, "{dtype:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn all_gather_concatenates_in_rank_order_along_any_dim() -> TestResult {
        let n = 2;
        // Sizes along the gathered dimension differ between ranks (r + 1).
        for dim in 0..3 {
            let shape = |r: usize| {
                let mut dims = vec![2, 3, 4];
                dims[dim] = r + 1;
                dims
            };
            let Some(results) = on_ranks(n, config(), |comm| {
                let mine = contribution(comm.rank(), &shape(comm.rank()), DType::F32)?
                    .to_device(comm.device())?;
                let all = comm.all_gather(&mine, dim)?;
                Ok((all.dims().to_vec(), f32_values(&all)?))
            })?
            else {
                return Ok(());
            };
            let parts = (0..n)
                .map(|r| contribution(r, &shape(r), DType::F32))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let want = Tensor::cat(&parts, dim)?;
            for (dims, values) in &results {
                assert_eq!(dims.as_slice(), want.dims());
                assert_eq!(values, &f32_values(&want)?);
            }
        }
        Ok(())
    }

    #[test]
    fn all_to_all_delivers_tensor_i_to_rank_i() -> TestResult {
        let n = 2;
        // From rank `from` to rank `to`: shape (to + 1, from + 2), values offset by 10·from + to.
        let piece = |from: usize, to: usize| -> candle_core::Result<Tensor> {
            contribution(0, &[to + 1, from + 2], DType::BF16)?.affine(1.0, (10 * from + to) as f64)
        };
        let Some(results) = on_ranks(n, config(), |comm| {
            let me = comm.rank();
            let out = (0..n)
                .map(|to| piece(me, to)?.to_device(comm.device()))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let got = comm.all_to_all(out)?;
            for (from, t) in got.iter().enumerate() {
                let want = piece(from, me)?;
                assert_eq!((t.dims(), t.dtype()), (want.dims(), want.dtype()));
                assert_eq!(f32_values(t)?, f32_values(&want)?);
            }
            Ok(())
        })?
        else {
            return Ok(());
        };
        assert_eq!(results.len(), n);
        Ok(())
    }

    #[test]
    fn ring_send_recv_broadcast_barrier_and_subgroups() -> TestResult {
        let n = 2;
        let Some(results) = on_ranks(n, config(), |comm| {
            let (me, dev) = (comm.rank(), comm.device().clone());
            let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
            // Ring attention's pattern: everybody sends first, then receives; twice, so that
            // the second round follows a completed first one.
            for round in 0..2 {
                let dtype = [DType::F32, DType::U8][round];
                let mine = contribution(me, &[2, 3 + round], dtype)?.to_device(&dev)?;
                comm.send(&mine, next)?;
                let got = comm.recv(prev, &dev)?;
                let want = contribution(prev, &[2, 3 + round], dtype)?;
                assert_eq!((got.dims(), got.dtype()), (want.dims(), dtype));
                assert_eq!(f32_values(&got)?, f32_values(&want)?);
            }
            // A send collected by a receive only after the sender's next collective.
            if me == 0 {
                comm.send(&contribution(7, &[4], DType::F32)?.to_device(&dev)?, 1)?;
            }
            comm.barrier()?;
            if me == 1 {
                let got = comm.recv(0, &dev)?;
                assert_eq!(
                    f32_values(&got)?,
                    f32_values(&contribution(7, &[4], DType::F32)?)?
                );
            }
            for root in 0..n {
                let theirs = contribution(root, &[3, 2], DType::F16)?;
                let mine = theirs.to_device(&dev)?;
                let got = comm.broadcast((me == root).then_some(&mine), root, &dev)?;
                assert_eq!(f32_values(&got)?, f32_values(&theirs)?);
            }
            let sub = comm.subgroup(&[0, 1])?;
            assert_eq!((sub.rank(), sub.world_size()), (me, n));
            let sum = sub.all_reduce_sum(&Tensor::ones(4, DType::F32, &dev)?)?;
            assert_eq!(f32_values(&sum)?, vec![n as f32; 4]);
            let alone = comm.subgroup(&[me])?;
            assert_eq!(alone.world_size(), 1);
            assert!(comm.send(&sum, me).is_err());
            comm.barrier()?;
            Ok(comm.bytes_sent())
        })?
        else {
            return Ok(());
        };
        assert!(results.iter().all(|&b| b > 0));
        Ok(())
    }

    #[test]
    fn a_receive_nobody_answers_times_out_and_aborts() -> TestResult {
        let config = NcclConfig {
            timeout: Duration::from_secs(2),
            synchronous: false,
        };
        // Rank 1 stays alive (its sockets open), connected and silent until rank 0 has given
        // up, so that rank 0's wait can only end by its own time-out (an event, not a clock
        // reading); a rank 0 that never gives up trips rank 1's hang guard.
        let (gave_up, wait) = std::sync::mpsc::channel::<()>();
        let wait = std::sync::Mutex::new(wait);
        let Some(results) = on_ranks(2, config, |comm| {
            let dev = comm.device().clone();
            // Connect both directions first: NCCL sets up a peer connection inside
            // ncclGroupEnd on first use, and that wait is not bounded (see the module notes).
            let other = 1 - comm.rank();
            comm.send(&Tensor::ones(3, DType::F32, &dev)?, other)?;
            comm.recv(other, &dev)?;
            if comm.rank() == 1 {
                let given_up = wait
                    .lock()
                    .map_err(|_| "rank 0 panicked")?
                    .recv_timeout(HANG_GUARD);
                if given_up.is_err() {
                    return Err(format!("hang guard ({HANG_GUARD:?}): rank 0 never gave up").into());
                }
                return Ok(true);
            }
            let received = comm.recv(1, comm.device());
            let _ = gave_up.send(());
            let err = match received {
                Ok(_) => return Err("a receive without a sender returned".into()),
                Err(e) => e,
            };
            assert!(
                matches!(
                    err,
                    CommError::Backend {
                        rank: 0,
                        op: Op::Recv,
                        ..
                    }
                ),
                "{err}"
            );
            // Aborted: every later call fails at once.
            assert!(comm.barrier().is_err());
            Ok(false)
        })?
        else {
            return Ok(());
        };
        assert_eq!(results, vec![false, true]);
        Ok(())
    }
}
