//! `longtake`: the studio command line.
//!
//! `render` runs a text-to-video job and writes the clip; `check-reference` compares the model
//! stack with PyTorch reference fixtures. Errors end the process with one line on stderr and a
//! non-zero exit status.

mod check_reference;
mod launch;
mod render;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "longtake",
    version,
    about = "Render long text-to-video clips with open video diffusion transformers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Render a clip from a text prompt and write it as MP4 (H.264) or a PNG sequence.
    Render(Box<render::RenderArgs>),
    /// Run every case of reference fixture directories and report the error of each.
    CheckReference(check_reference::CheckReferenceArgs),
    /// One process of a parallel render (started by `render --layout`).
    #[command(hide = true)]
    Rank(Box<render::RankArgs>),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LONGTAKE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Render(args) => {
            // The launcher hands a parallel render's ranks the same arguments.
            let raw: Vec<_> = std::env::args_os()
                .skip_while(|a| a != "render")
                .skip(1)
                .collect();
            render::run(*args, raw)
        }
        Command::Rank(args) => render::run_rank(*args),
        Command::CheckReference(args) => check_reference::run(args),
    };
    match outcome {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            std::process::exit(1);
        }
    }
}

/// The error and its causes on one line, outermost first. Causes whose text an outer message
/// already quotes are left out, so nothing is said twice.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line.replace('\n', " ")
}
