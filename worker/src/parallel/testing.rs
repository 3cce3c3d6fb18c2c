//! Test helpers shared by the distributed transformer's and pipeline's tests: the layouts they
//! cover and a loopback job whose ranks are threads.

use candle_core::Tensor;

use super::comm::Communicator;
use super::layout::Layout;
use super::tcp::{loopback_listeners, TcpMesh, TcpMeshConfig};

pub(crate) type TestError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type TestResult<T = ()> = std::result::Result<T, TestError>;

/// The layouts every case runs, as (tp, ulysses, ring, cfg).
pub(crate) const LAYOUTS: [(usize, usize, usize, usize); 8] = [
    (2, 1, 1, 1),
    (1, 2, 1, 1),
    (1, 1, 2, 1),
    (1, 1, 1, 2),
    (2, 2, 1, 1),
    (1, 2, 2, 1),
    (2, 1, 2, 1),
    (1, 2, 1, 2),
];

pub(crate) fn layout((tp, ulysses, ring, cfg): (usize, usize, usize, usize)) -> Layout {
    Layout {
        cfg,
        tp,
        ulysses,
        ring,
    }
}

/// Runs `f(rank, world)` on `world` threads joined by a loopback TCP mesh; results by rank.
pub(crate) fn run_ranks<T: Send>(
    world: usize,
    f: impl Fn(usize, Box<dyn Communicator>) -> TestResult<T> + Sync,
) -> TestResult<Vec<T>> {
    let (listeners, addrs) = loopback_listeners(world)?;
    let (f, addrs) = (&f, &addrs);
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                scope.spawn(move || -> TestResult<T> {
                    let mesh = TcpMesh::connect_with_listener(
                        TcpMeshConfig::new(rank, addrs.clone()),
                        listener,
                    )?;
                    f(rank, Box::new(mesh))
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| match h.join() {
                Ok(result) => result.map_err(|e| format!("rank {rank}: {e}").into()),
                Err(_) => Err(format!("rank {rank} panicked").into()),
            })
            .collect()
    })
}

/// The bit patterns of an f32 tensor, for comparing runs that must be bit-identical.
pub(crate) fn bits(t: &Tensor) -> TestResult<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f32::to_bits)
        .collect())
}
