//! What traces and metrics cost a render, side by side in one run: the same job on a farm of
//! separate processes (etcd, a coordinator, one worker) with telemetry off (no `--metrics-listen`,
//! no OTLP endpoint), and with it on (`/metrics` on both daemons, scraped once a second during
//! the job, and every span exported over OTLP/gRPC to a receiver in this process, collectives
//! included). The rounds alternate off/on so that a noisy machine hurts both alike; each job's
//! step time is its denoising time over its steps, as the worker measured it
//! (`time_split.denoise_s`).
//!
//! `cargo bench -p longtake-cli --bench telemetry -- [--rounds N] [--steps N]`
//! (`--profile dev` reuses the test build). `cargo test` does not run it.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::cli::{field, spec_of};
use support::farm::Farm;
use support::otlp::Receiver;

fn arg(args: &[String], name: &str, default: u32) -> u32 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
        .unwrap_or(default)
}

/// Seconds per denoising step of each of `jobs` renders on `farm`.
fn step_times(farm: &Farm, steps: u32, jobs: u32, scrape: Option<&str>) -> Vec<f64> {
    let spec = spec_of("33", "128x128", steps);
    (0..jobs)
        .map(|_| {
            let id = farm.submit(&spec, &[]);
            let job = farm.wait_until("the job ends", Duration::from_secs(600), || {
                if let Some(url) = scrape {
                    support::metrics::scrape(url);
                }
                let job = farm.job(&id);
                match field(&job, "state") {
                    "done" => Ok(job),
                    "failed" | "cancelled" => panic!("the job ended {job}"),
                    _ => {
                        std::thread::sleep(Duration::from_millis(1000));
                        Err(job.to_string())
                    }
                }
            });
            job["time_split"]["denoise_s"]
                .as_f64()
                .expect("a done job has its time split")
                / f64::from(steps)
        })
        .collect()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds = arg(&args, "--rounds", 3);
    let steps = arg(&args, "--steps", 20);
    let jobs = 3;
    let receiver = Receiver::start();
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        {
            let mut farm = Farm::start();
            farm.start_worker("w1", &[]);
            let times = step_times(&farm, steps, jobs, None);
            eprintln!("round {round} off: {times:.4?} s/step");
            off.extend(times);
        }
        {
            let env = [
                ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url()),
                ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ];
            let mut farm = Farm::start_with_env(&["--metrics-listen", "127.0.0.1:0"], &env);
            let metrics = farm.coordinator_line("coordinator metrics on ");
            farm.start_worker("w1", &["--metrics-listen", "127.0.0.1:0"]);
            let times = step_times(&farm, steps, jobs, Some(&metrics));
            eprintln!("round {round} on:  {times:.4?} s/step");
            on.extend(times);
        }
    }
    let spans = receiver.spans().len();
    let (off, on) = (median(&mut off), median(&mut on));
    println!(
        "telemetry: {steps} steps of 33 frames at 128x128 (tiny model), {} jobs each way in {rounds} alternating rounds",
        jobs * rounds
    );
    println!("  off: median {:.4} s/step", off);
    println!(
        "  on:  median {:.4} s/step ({spans} spans received, /metrics scraped every second)",
        on
    );
    println!(
        "  on/off: {:.4} ({:+.2}%)",
        on / off,
        (on / off - 1.0) * 100.0
    );
}
