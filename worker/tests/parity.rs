//! Parity with the PyTorch reference: every case of every fixture directory must pass.
//!
//! Fixtures are looked up in `LONGTAKE_REFERENCE_DIR` (a `:`-separated list of directories, each a
//! fixture or a directory of fixtures); by default `../shared/reference` beside the repository and
//! the repository's own `tests/fixtures`. Finding none is a failure, not a skip.

use longtake_worker::model::reference::{check_fixture, test_fixture_dirs};

#[test]
fn every_reference_case_passes() {
    let dirs = test_fixture_dirs();
    let mut report = Vec::new();
    let mut failed = 0;
    for dir in &dirs {
        report.push(dir.display().to_string());
        for result in check_fixture(dir, &candle_core::Device::Cpu) {
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
