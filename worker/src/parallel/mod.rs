//! The parallel runtime: how the ranks of a job are laid out (`layout`), and communicators that
//! move candle tensors between them (a single-rank one and a TCP mesh for CPUs), on which the
//! tensor, Ulysses, Ring and CFG parallel paths are built. Every distributed path must give the
//! single-process result, so the collectives here are deterministic: the same inputs give
//! bit-identical outputs on every rank and every run.

pub mod comm;
pub mod layout;
pub mod single;
pub mod tcp;

pub use comm::{CommError, Communicator, Op, PeerId};
pub use single::SingleRank;
pub use tcp::{TcpMesh, TcpMeshConfig, Timeouts};
