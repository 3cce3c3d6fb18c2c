//! `longtake check-reference DIR`: the parity report over reference fixture directories.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use longtake_worker::model::{device, reference};

#[derive(Args)]
pub struct CheckReferenceArgs {
    /// A fixture directory (with pipeline/ and cases/) or a directory of them.
    dir: PathBuf,
    /// Where the models run: cpu, or cuda / cuda:N with a CUDA build.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the transformer and the VAE: f32, bf16 or f16 (tolerances widen with it)
    /// [default: f32 on cpu, bf16 on cuda].
    #[arg(long)]
    dtype: Option<String>,
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
    let device = device::parse_device(&args.device)?;
    let dtype = device::parse_dtype(args.dtype.as_deref(), &device)?;
    let tolerances = reference::Tolerances::for_dtype(dtype);
    println!(
        "{:?} on {}: modules within {:.0e}, the pipeline within {:.0e} (relative L2)",
        dtype, args.device, tolerances.module, tolerances.pipeline
    );
    let mut failed = 0;
    let mut total = 0;
    for dir in fixtures {
        println!("{}", dir.display());
        for result in reference::check_fixture(&dir, &device, dtype) {
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
