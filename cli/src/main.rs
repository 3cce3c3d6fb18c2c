//! `longtake`: the studio command line.
//!
//! `render` submits a text-to-video job, watches it and downloads the clip (running a whole farm
//! in this process when no coordinator is named); `submit`, `status`, `watch`, `list`, `cancel`,
//! `fetch` and `workers` talk to a running farm; `serve` runs a farm's coordinator or workers;
//! `certs init` makes a farm's development TLS certificates; `check-reference` compares the model stack with PyTorch reference fixtures; `inspect` checks a
//! rendered toy-world clip against its caption. Errors end the process with one line on stderr
//! and exit status 1.

mod certs;
mod check_reference;
mod client;
mod download;
mod embedded;
mod inputs;
mod inspect_command;
mod jobs;
mod progress;
mod render;
mod serve;
mod spec_args;
mod traces;
mod views;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "longtake",
    version,
    about = "Render long text-to-video clips with open video diffusion transformers, on one machine or a farm"
)]
struct Cli {
    /// Export traces over OTLP/gRPC to this collector, e.g. http://127.0.0.1:4317
    /// [default: $OTEL_EXPORTER_OTLP_ENDPOINT; none: no traces].
    #[arg(long, global = true, value_name = "URL")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Render a clip: submit, watch, download to --out (MP4 or a PNG sequence). Without
    /// --coordinator / LONGTAKE_COORDINATOR it runs a farm in this process.
    Render(Box<render::RenderArgs>),
    /// Extend a clip: render --seconds more after its last frame (the model holds the clip's
    /// last frames as the start of its first window), download the clip followed by the new
    /// frames to --out, and report the join.
    Extend(Box<render::ExtendArgs>),
    /// Queue a render on a farm and print its job id.
    Submit(Box<jobs::SubmitArgs>),
    /// Show a job.
    Status(jobs::ShowArgs),
    /// Follow a job's progress until it ends (exit 1 if it fails or is cancelled).
    Watch(jobs::ShowArgs),
    /// List the farm's jobs, oldest first.
    List(jobs::ListArgs),
    /// Cancel a queued or running job.
    Cancel(jobs::CancelArgs),
    /// Download a finished job's output.
    Fetch(jobs::FetchArgs),
    /// List the farm's live workers.
    Workers(jobs::WorkersArgs),
    /// Run a farm process: `serve coordinator` or `serve worker`.
    #[command(subcommand)]
    Serve(serve::ServeCommand),
    /// TLS certificates of a farm: `certs init` makes a development CA and the coordinator's
    /// and workers' certificates.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Run every case of reference fixture directories and report the error of each.
    CheckReference(check_reference::CheckReferenceArgs),
    /// Check a rendered toy-world clip against its caption: background, object colour and
    /// direction (exit 1 if any is wrong), with shape and consistency figures.
    Inspect(inspect_command::InspectArgs),
}

fn main() {
    let cli = Cli::try_parse().unwrap_or_else(|err| usage_error(err));
    if let Some(endpoint) = &cli.otlp_endpoint {
        // the one place the endpoint is read from, for this process and the exporter alike
        std::env::set_var(traces::OTLP_ENDPOINT_ENV, endpoint);
    }
    // The farm's daemons also write the audit log (who submitted, watched, cancelled, fetched
    // which job, and every refusal); a command run by a person shows warnings only.
    let (service, default_log) = match &cli.command {
        Command::Serve(serve::ServeCommand::Coordinator(_)) => {
            ("longtake-coordinator", "warn,longtake::audit=info")
        }
        Command::Serve(serve::ServeCommand::Worker(_)) => {
            ("longtake-worker", "warn,longtake::audit=info")
        }
        _ => ("longtake-cli", "warn"),
    };
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            let traces = {
                let _inside = runtime.enter();
                traces::init(service, default_log)
            }?;
            let span = longtake_proto::telemetry::cli_span(command_name(&cli.command));
            let outcome = match cli.command {
                Command::CheckReference(args) => check_reference::run(args),
                Command::Inspect(args) => inspect_command::run(args),
                Command::Certs(command) => certs::run(command),
                command => runtime.block_on(tracing::Instrument::instrument(run(command), span)),
            };
            traces.shutdown();
            outcome
        });
    match outcome {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            std::process::exit(1);
        }
    }
}

/// The command's name, as the root span of its trace names it.
fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Render(_) => "render",
        Command::Extend(_) => "extend",
        Command::Submit(_) => "submit",
        Command::Status(_) => "status",
        Command::Watch(_) => "watch",
        Command::List(_) => "list",
        Command::Cancel(_) => "cancel",
        Command::Fetch(_) => "fetch",
        Command::Workers(_) => "workers",
        Command::Serve(_) => "serve",
        Command::Certs(_) => "certs",
        Command::CheckReference(_) => "check-reference",
        Command::Inspect(_) => "inspect",
    }
}

async fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Render(args) => render::run(*args).await,
        Command::Extend(args) => render::extend(*args).await,
        Command::Submit(args) => jobs::submit(*args).await,
        Command::Status(args) => jobs::status(args).await,
        Command::Watch(args) => jobs::watch(args).await,
        Command::List(args) => jobs::list(args).await,
        Command::Cancel(args) => jobs::cancel(args).await,
        Command::Fetch(args) => jobs::fetch(args).await,
        Command::Workers(args) => jobs::workers(args).await,
        Command::Serve(command) => serve::run(command).await,
        Command::CheckReference(args) => check_reference::run(args),
        Command::Inspect(args) => inspect_command::run(args),
        Command::Certs(command) => certs::run(command),
    }
}

/// Help and version go out as clap prints them; a usage error becomes the one `error:` line
/// (with clap's tip, if any) and exit status 1, like every other failure.
fn usage_error(err: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        err.exit();
    }
    let text = err.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("error: bad arguments");
    let mut line = first.strip_prefix("error: ").unwrap_or(first).to_string();
    if let Some(tip) = lines.find(|l| l.starts_with("tip:")) {
        line.push_str(&format!(" ({tip})"));
    }
    eprintln!("error: {line}; see `longtake --help`");
    std::process::exit(1);
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
