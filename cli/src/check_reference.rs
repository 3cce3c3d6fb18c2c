//! `longtake check-reference DIR`: the parity report over reference fixture directories.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use longtake_worker::model::reference;

#[derive(Args)]
pub struct CheckReferenceArgs {
    /// A fixture directory (with pipeline/ and cases/) or a directory of them.
    dir: PathBuf,
}

/// Prints one line per case; exit status 1 when any case fails.
pub fn run(args: CheckReferenceArgs) -> Result<i32> {
    let fixtures = reference::find_fixture_dirs(&args.dir);
    if fixtures.is_empty() {
        bail!(
            "{}: no reference fixtures here (a fixture directory has pipeline/ and cases/, like shared/reference/wan-tiny)",
            args.dir.display()
        );
    }
    let device = candle_core::Device::Cpu;
    let mut failed = 0;
    let mut total = 0;
    for dir in fixtures {
        println!("{}", dir.display());
        for result in reference::check_fixture(&dir, &device) {
            println!("  {result}");
            total += 1;
            if !result.passed() {
                failed += 1;
            }
        }
    }
    println!("{} passed, {failed} failed", total - failed);
    Ok(if failed == 0 { 0 } else { 1 })
}
