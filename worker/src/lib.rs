//! longtake's worker side.
//!
//! - `families`: the model families, one folder each (`wan/`: Wan2.1 text-to-video: its
//!   configuration and modules, its distributed form, its single-process and distributed
//!   pipelines), and the choice of a family's pipeline by the checkpoint's `model_index.json`.
//! - `model`: the generic model parts every family uses: checkpoints and the weight backend,
//!   tokenizer and umT5 text encoder, attention core, schedulers, initial noise, the resumable
//!   denoiser, frames, the render types and the `VideoPipeline` trait.
//! - `parallel`: the parallel runtime: layouts and groups, communicators (single rank, TCP mesh,
//!   NCCL), and model-agnostic sequence-parallel attention (Ulysses, ring).
//! - `daemon`: the worker process around them: gRPC service, membership, one task at a time.
//!
//! No network code lives above the communicators.
//!
//! Every binary that links the worker (the daemons, the CLI's embedded farm, the benches) uses
//! mimalloc: candle allocates a fresh tensor per operation, tens of megabytes each on a long
//! clip, and glibc's malloc hands large blocks back to the kernel on free, so every operation
//! page-faulted its output in again (a tenth of the tiny model's forward).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod daemon;
pub mod families;
pub mod model;
pub mod parallel;
