//! The parallel runtime, model-agnostic: how the ranks of a job are laid out (`layout`) and
//! grouped (`group`), communicators that move candle tensors between them (a single-rank one, a
//! TCP mesh for CPUs, admitted by the attempt's secret (`mesh_secret`), and, with the `cuda`
//! feature, NCCL for GPUs), and on them sequence-parallel
//! attention over q/k/v tensors: Ulysses all-to-all (`ulysses`) and ring attention with a
//! log-sum-exp merge (`ring`). A model family's distributed form (e.g.
//! `crate::families::wan::distributed`) is built from these. Every distributed path
//! must give the single-process result, so the collectives here are deterministic: the same
//! inputs give bit-identical outputs on every rank and every run (for NCCL: for a fixed
//! topology, see `nccl`).

pub mod comm;
pub mod group;
pub mod layout;
pub mod mesh_secret;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;
pub mod single;
pub mod tcp;
#[cfg(test)]
pub(crate) mod testing;
pub mod ulysses;

pub use comm::{CommError, Communicator, Op, PeerId};
pub use group::Group;
pub use mesh_secret::MeshSecret;
#[cfg(feature = "cuda")]
pub use nccl::{NcclCommunicator, NcclConfig, NcclId};
pub use single::SingleRank;
pub use tcp::{TcpMesh, TcpMeshConfig, Timeouts};
