//! Parity with the PyTorch reference: every case of every fixture directory must pass, in f32 and
//! in the half precisions GPUs run (within their wider tolerances: `Tolerances::for_dtype`).
//!
//! Fixtures are looked up in `LONGTAKE_REFERENCE_DIR` (a `:`-separated list of directories, each a
//! fixture or a directory of fixtures); by default `../shared/reference` beside the repository and
//! the repository's own `tests/fixtures`. Finding none is a failure, not a skip.

use candle_core::{DType, Device};
use longtake_worker::model::reference::{check_fixture, parity_fixture_dirs};

fn every_case_passes_in(dtype: DType) {
    let dirs = parity_fixture_dirs();
    assert!(
        dirs.iter().any(|dir| dir.ends_with("wan-i2v-tiny")),
        "the image-to-video fixture is missing from {dirs:?}"
    );
    let mut report = Vec::new();
    let mut failed = 0;
    for dir in &dirs {
        report.push(format!("{} ({dtype:?})", dir.display()));
        for result in check_fixture(dir, &Device::Cpu, dtype) {
            if !result.passed() {
                failed += 1;
            }
            report.push(format!("  {result}"));
        }
    }
    let report = report.join("\n");
    println!("{report}");
    assert_eq!(failed, 0, "{failed} reference cases failed:\n{report}");
}

#[test]
fn every_reference_case_passes() {
    every_case_passes_in(DType::F32);
}

#[test]
fn every_reference_case_passes_in_bf16() {
    every_case_passes_in(DType::BF16);
}

#[test]
fn every_reference_case_passes_in_f16() {
    every_case_passes_in(DType::F16);
}
