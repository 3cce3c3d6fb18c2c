//! The parallel runtime: how the ranks of a job are laid out (`layout`), communicators that move
//! candle tensors between them (a single-rank one and a TCP mesh for CPUs), and on them the
//! tensor (`tensor_parallel`), Ulysses (`ulysses`), Ring (`ring`) and CFG parallel paths of the
//! Wan transformer (`dit`). Every distributed path must give the single-process result, so the
//! collectives here are deterministic: the same inputs give bit-identical outputs on every rank
//! and every run.

pub mod comm;
pub mod dit;
pub mod group;
pub mod layout;
pub mod pipeline;
pub mod ring;
pub mod single;
pub mod tcp;
pub mod tensor_parallel;
#[cfg(test)]
pub(crate) mod testing;
pub mod ulysses;

pub use comm::{CommError, Communicator, Op, PeerId};
pub use dit::DistributedWanTransformer;
pub use group::Group;
pub use pipeline::DistributedPipeline;
pub use single::SingleRank;
pub use tcp::{TcpMesh, TcpMeshConfig, Timeouts};
