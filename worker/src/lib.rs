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
static ALLOCATOR: Allocator = Allocator;

/// How long mimalloc keeps freed memory before giving it back to the kernel. Its default (1 s)
/// still returned a denoising step's tensors between steps often enough that the kernel zeroing
/// the pages faulted in again was 8% of the mid transformer's forward (13% of its profile with
/// the weights' set-up); a worker reuses a step's memory within the next step, and an idle one
/// gives it back after this delay (arenas' pages after ten times it).
const KEEP_FREED_MEMORY_MS: std::ffi::c_long = 10_000;

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_e` of the `mimalloc.h` that
/// `libmimalloc-sys` builds, mimalloc 3.3.2, which the worker's `Cargo.toml` pins; the Rust
/// bindings do not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// The mimalloc version that place is read from.
#[cfg(test)]
const MIMALLOC_VERSION: std::ffi::c_int = 30302;

/// mimalloc, its purge delay set and transparent huge pages turned off for the process at its
/// first allocation. Huge pages: mimalloc asks for them on its arenas (`MADV_HUGEPAGE`), and
/// where the kernel compacts memory to find them on a fault (`defrag` `madvise`, Debian's and
/// this machine's default) a one-shot Wan2.1-size VAE decode spent 3.1 s of system time on it
/// and ran in 4.5 s, against 0.8 s and 3.3 s without them; the transformer's forward ran no
/// faster with them (710-800 ms against 730-740 ms, the machine's noise). Done at the first
/// allocation because a library has no hook before `main` that every binary keeps (a constructor
/// in `.init_array` was dropped by the linker with the unreferenced object that held it).
struct Allocator;

static PURGE_DELAY_SET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Allocator {
    #[inline]
    fn configure(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if !PURGE_DELAY_SET.load(Relaxed) {
            // SAFETY: setting an option is a store to mimalloc's option table (no allocation),
            // valid at any time; two threads racing here store the same value.
            unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, KEEP_FREED_MEMORY_MS) };
            #[cfg(target_os = "linux")]
            // SAFETY: PR_SET_THP_DISABLE only sets a flag of this process's memory map.
            unsafe {
                libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0)
            };
            PURGE_DELAY_SET.store(true, Relaxed);
        }
    }
}

// SAFETY: every call is mimalloc's, unchanged.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        self.configure();
        mimalloc::MiMalloc.alloc(layout)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        self.configure();
        mimalloc::MiMalloc.alloc_zeroed(layout)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        mimalloc::MiMalloc.dealloc(ptr, layout)
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        mimalloc::MiMalloc.realloc(ptr, layout, size)
    }
}

pub mod daemon;
pub mod families;
pub mod model;
pub mod parallel;

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The allocator set the delay (in this test binary, which links the library like every
    /// binary).
    #[test]
    fn freed_memory_is_kept_for_the_delay() {
        // SAFETY: reading mimalloc's version.
        let version = unsafe { libmimalloc_sys::mi_version() };
        assert_eq!(
            version,
            super::MIMALLOC_VERSION,
            "another mimalloc: check MI_OPTION_PURGE_DELAY against its mimalloc.h"
        );
        // SAFETY: reading an option.
        let delay = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay, super::KEEP_FREED_MEMORY_MS);
        // SAFETY: reading this process's flag.
        let thp_disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(thp_disabled, 1);
    }
}
