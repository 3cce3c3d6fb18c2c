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
    let secret = &crate::parallel::MeshSecret::random();
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                scope.spawn(move || -> TestResult<T> {
                    let mesh = TcpMesh::connect_with_listener(
                        TcpMeshConfig::new(rank, addrs.clone(), secret.clone()),
                        listener,
                    )?;
                    f(rank, Box::new(mesh))
                })
            })
            .collect();
        let mut results = Vec::with_capacity(world);
        let mut failures = Vec::new();
        for (rank, handle) in handles.into_iter().enumerate() {
            match handle.join() {
                Ok(Ok(value)) => results.push(value),
                Ok(Err(e)) => failures.push(format!("rank {rank}: {e}")),
                Err(_) => failures.push(format!("rank {rank} panicked")),
            }
        }
        // Every rank's failure: the first rank's is often only that a peer went away.
        if failures.is_empty() {
            Ok(results)
        } else {
            Err(failures.join("\n").into())
        }
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

/// The largest difference in 8-bit levels between two runs' frames (the same length: checked).
pub(crate) fn largest_level_difference(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len(), "frames of different lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// What a model takes of [`LAYOUTS`]: stated per fixture, never worked out from the model by the
/// filter under test, so that a layout that should run and does not is a failure.
pub(crate) enum Takes {
    /// Every layout of [`LAYOUTS`].
    All,
    /// Only these; every other layout of [`LAYOUTS`] must be refused by [`Layout::validate`].
    Only(&'static [(usize, usize, usize, usize)]),
}

/// The fixtures the layout tests must find among the test fixtures: each runs every layout.
pub(crate) const FIXTURES_TAKING_EVERY_LAYOUT: [&str; 2] = ["wan-tiny", "wan-wide"];

/// The layouts of the fixture in `dir`, by its directory name. A fixture of a family the tests
/// run but not listed here fails the test: it must be given its list, not skipped.
pub(crate) fn fixture_takes(dir: &std::path::Path) -> Takes {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    match name {
        // 4 heads, ffn_dim 128 / 8 heads, ffn_dim 80 (75 tokens): every 2- and 4-way split.
        "wan-tiny" | "wan-wide" => Takes::All,
        // 3 heads: neither tp nor ulysses can split them; ring and cfg can.
        "wan-tiny-alt" => Takes::Only(&[(1, 1, 2, 1), (1, 1, 1, 2)]),
        other => panic!(
            "fixture {other:?} ({}) has no list of the layouts it takes: add it to \
             parallel::testing::fixture_takes",
            dir.display()
        ),
    }
}

/// Checks that the fixtures of `dirs` include every one of [`FIXTURES_TAKING_EVERY_LAYOUT`]: the
/// layout tests cannot pass on a fixture set that leaves out the models that take every layout.
pub(crate) fn assert_every_layout_fixture_present(dirs: &[std::path::PathBuf]) {
    for wanted in FIXTURES_TAKING_EVERY_LAYOUT {
        assert!(
            dirs.iter()
                .any(|d| d.file_name().and_then(|n| n.to_str()) == Some(wanted)),
            "the layout tests need the fixture {wanted} (in ../shared/reference or \
             LONGTAKE_REFERENCE_DIR); found {dirs:?}"
        );
    }
}

impl Takes {
    /// Whether `layout` is one this model takes.
    pub(crate) fn takes(&self, layout: Layout) -> bool {
        match self {
            Takes::All => true,
            Takes::Only(listed) => listed.iter().any(|&l| self::layout(l) == layout),
        }
    }
}

/// For a layout the model does not take: `validate` refuses it, with a message naming what does
/// not divide. Returns the message.
pub(crate) fn assert_refused(
    name: &str,
    layout: Layout,
    limits: &longtake_proto::spec::LayoutLimits,
) -> String {
    match layout.validate(limits) {
        Ok(()) => panic!("{name}: {layout} is listed as refused but validate accepts it"),
        Err(why) => {
            let why = why.to_string();
            assert!(
                why.contains("does not divide") && why.contains("try "),
                "{name}: {layout}: the refusal does not say why and what to try: {why}"
            );
            println!("{name}: {layout}: refused as listed: {why}");
            why
        }
    }
}
