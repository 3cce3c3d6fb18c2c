//! `longtake serve coordinator` and `longtake serve worker`: the farm's long-running processes,
//! with etcd for membership (and, for the coordinator, the job records). Each prints one ready
//! line on stdout (so `--listen 127.0.0.1:0` can be discovered) and stops on SIGTERM / SIGINT.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use longtake_coordinator::access::{Access, Tokens};
use longtake_coordinator::leadership::Leadership;
use longtake_coordinator::placement::RankQuotas;
use longtake_coordinator::{Coordinator, CoordinatorConfig, EtcdJobStore, Limits};
use longtake_proto::membership::{EtcdConfig, EtcdMembership, Membership};
use longtake_proto::metrics::Scrape;
use longtake_proto::tls::{Tls, TlsFiles, COORDINATOR_NAME, WORKER_NAME};
use longtake_worker::daemon::{self, DaemonConfig, ModelSource};
use longtake_worker::parallel::Timeouts;

/// How often `serve worker` looks for its own record before it says it is ready.
const REGISTERED_POLL: Duration = Duration::from_millis(50);

#[derive(Subcommand)]
pub enum ServeCommand {
    /// The coordinator: job API, queue, placement; jobs and membership in etcd.
    Coordinator(Box<CoordinatorArgs>),
    /// A worker daemon: registers in etcd and runs the tasks the coordinator gives it.
    Worker(Box<WorkerArgs>),
}

/// Where the farm's etcd is and under which key prefix.
#[derive(Args, Clone, Debug)]
pub struct EtcdArgs {
    /// etcd client URLs, comma-separated, e.g. http://127.0.0.1:2379.
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        value_name = "URL[,URL...]"
    )]
    pub etcd: Vec<String>,
    /// Key prefix of this farm in etcd.
    #[arg(long, default_value = "/longtake")]
    pub prefix: String,
    /// The CA of etcd's certificate (PEM), for `https://` etcd URLs.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) for an etcd that requires one (`--client-cert-auth`); with
    /// --etcd-key. The farm's own certificates serve (`certs init` makes them for client
    /// authentication too).
    #[arg(long, value_name = "FILE", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["etcd_cert", "etcd_ca"])]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    fn config(&self) -> Result<EtcdConfig> {
        let mut config = EtcdConfig::new(
            self.etcd
                .iter()
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect(),
        );
        config.prefix = self.prefix.clone();
        let https = config.endpoints.iter().any(|u| u.starts_with("https://"));
        match (&self.etcd_ca, https) {
            (Some(ca), true) => {
                let identity = self.etcd_cert.as_deref().zip(self.etcd_key.as_deref());
                config.tls = Some(longtake_proto::tls::etcd_client(ca, identity)?);
            }
            (None, true) => bail!(
                "etcd at {} speaks TLS: pass --etcd-ca FILE (and --etcd-cert/--etcd-key if it \
                 requires client certificates)",
                config.endpoints_text()
            ),
            (Some(_), false) => bail!(
                "--etcd-ca is for https:// etcd URLs; {} is plain http",
                config.endpoints_text()
            ),
            (None, false) => {}
        }
        Ok(config)
    }
}

/// A daemon's TLS material (`longtake certs init` makes a development set). All three, or none
/// (plain gRPC: a farm on loopback).
#[derive(Args, Clone, Debug)]
pub struct TlsArgs {
    /// This daemon's certificate (PEM): with --tls-key and --tls-ca its gRPC endpoint speaks
    /// TLS, and the coordinator and its workers authenticate each other by certificate.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The farm's CA certificate (PEM), which issued every daemon's certificate.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The loaded material, checked for `role` (`None` without the flags).
    fn load(&self, role: &'static str) -> Result<Option<Tls>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                let files = TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                };
                Ok(Some(Tls::load(&files, role)?))
            }
            _ => Ok(None),
        }
    }
}

#[derive(Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Address the gRPC API listens on (port 0: any free port, printed when ready). Loopback
    /// by default: opening the API to a network (e.g. `0.0.0.0:7070`) is an explicit choice,
    /// to make with --tokens.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// API tokens: a file of `TOKEN OWNER [studio|admin]` lines (`#` comments). With it every
    /// call needs a token (`LONGTAKE_TOKEN` or `--token-file` on the CLI), jobs carry their
    /// owner and a studio reaches only its own jobs; without it every caller is an admin.
    #[arg(long, value_name = "FILE")]
    pub tokens: Option<PathBuf>,
    /// Most workers (ranks) one owner's jobs may hold at once; a job beyond it waits, holding
    /// no workers, and one that needs more than the quota is refused [default: no limit].
    #[arg(long, value_name = "N")]
    pub max_ranks_per_owner: Option<usize>,
    /// Prune jobs that ended longer ago than this (e.g. `30d`, `12h`), with their records and
    /// outputs [default: keep every job].
    #[arg(long, value_parser = humantime::parse_duration, value_name = "AGE")]
    pub retain_finished: Option<Duration>,
    /// One owner's own rank quota, OWNER=N (overrides --max-ranks-per-owner); repeatable.
    #[arg(long = "owner-max-ranks", value_parser = parse_quota, value_name = "OWNER=N")]
    pub owner_max_ranks: Vec<(String, usize)>,
    /// Directory finished outputs are written to and served from.
    #[arg(long)]
    pub artifacts: PathBuf,
    #[arg(long)]
    pub max_frames: Option<u32>,
    #[arg(long)]
    pub max_width: Option<u32>,
    #[arg(long)]
    pub max_height: Option<u32>,
    #[arg(long)]
    pub max_steps: Option<u32>,
    /// Longest prompt (and negative prompt), in characters.
    #[arg(long)]
    pub max_prompt_chars: Option<u32>,
    /// Most workers one job may use.
    #[arg(long)]
    pub max_ranks: Option<u32>,
    /// Most prompt changes (`--prompt-at` cues) one job may have.
    #[arg(long)]
    pub max_prompt_cues: Option<u32>,
    /// Longest job name, in characters.
    #[arg(long)]
    pub max_name_chars: Option<u32>,
    /// Largest input file (a picture to animate, a clip to extend) a job may be submitted with,
    /// in bytes [default: 48 MiB; at most 56 MiB, as a task carries it in one message].
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..=56 << 20))]
    pub max_input_bytes: Option<u64>,
    /// Checkpoint a job's denoiser state after every this many steps; a job whose worker is
    /// lost, or whose coordinator restarts, resumes from the last one (0: never; jobs of several
    /// worker groups are not checkpointed yet).
    #[arg(long, default_value_t = 1)]
    pub checkpoint_every: u32,
    /// Several coordinators may serve one farm (one etcd, one shared --artifacts directory):
    /// they elect a leader in etcd, which alone listens and schedules; the others stand by and
    /// the first in line takes over, with the running jobs, within this time of the leader's
    /// loss (at once when it stops on a signal).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", value_name = "TTL")]
    pub leader_ttl: Duration,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

/// Where a daemon serves its Prometheus metrics.
#[derive(Args, Clone, Debug, Default)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP) on this address, e.g.
    /// 127.0.0.1:9464 (port 0: any free port, printed when ready) [default: none].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

impl MetricsArgs {
    /// Binds the metrics listener, if one is asked for, and serves `scrape` on it for as long
    /// as the process runs; returns the address bound.
    async fn serve(&self, scrape: Arc<dyn Scrape>) -> Result<Option<SocketAddr>> {
        let Some(address) = self.metrics_listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen for metrics on {address}"))?;
        let address = listener.local_addr()?;
        tokio::spawn(async move {
            let served = longtake_proto::metrics::serve(listener, scrape, std::future::pending());
            if let Err(e) = served.await {
                tracing::error!("the metrics endpoint on {address} stopped: {e}");
            }
        });
        Ok(Some(address))
    }
}

impl CoordinatorArgs {
    fn limits(&self) -> Limits {
        let default = Limits::default();
        Limits {
            max_frames: self.max_frames.unwrap_or(default.max_frames),
            max_width: self.max_width.unwrap_or(default.max_width),
            max_height: self.max_height.unwrap_or(default.max_height),
            max_steps: self.max_steps.unwrap_or(default.max_steps),
            max_prompt_chars: self.max_prompt_chars.unwrap_or(default.max_prompt_chars),
            max_ranks: self.max_ranks.unwrap_or(default.max_ranks),
            max_prompt_cues: self.max_prompt_cues.unwrap_or(default.max_prompt_cues),
            max_name_chars: self.max_name_chars.unwrap_or(default.max_name_chars),
            max_input_bytes: self.max_input_bytes.unwrap_or(default.max_input_bytes),
        }
    }
}

#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// Address the WorkerService listens on (port 0: any free port, printed when ready).
    /// Loopback by default (a farm on one machine); a worker the coordinator reaches over a
    /// network listens on an explicit address (e.g. `0.0.0.0:7071`, with `--advertise`).
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub listen: SocketAddr,
    /// Host the coordinator and the other ranks reach this worker at [default: the listen host,
    /// or 127.0.0.1 for 0.0.0.0].
    #[arg(long)]
    pub advertise: Option<String>,
    /// Unique worker id [default: HOSTNAME-PORT].
    #[arg(long)]
    pub id: Option<String>,
    /// A model to serve: `toy` (built in, trained on procedural videos), `tiny` (built in,
    /// random weights, for tests), or NAME=DIR for a checkpoint directory; repeatable
    /// [default: toy].
    #[arg(long = "model", value_parser = parse_model, value_name = "toy|tiny|NAME=DIR")]
    pub models: Vec<ModelSource>,
    /// A placement label KEY=VALUE (node, zone, ...); repeatable.
    #[arg(long = "label", value_parser = parse_label, value_name = "KEY=VALUE")]
    pub labels: Vec<(String, String)>,
    /// Compute device: cpu, or cuda / cuda:N with a CUDA build.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision: f32, bf16 or f16 [default: f32 on cpu, bf16 on cuda].
    #[arg(long)]
    pub dtype: Option<String>,
    /// Seconds after which a worker that stopped keeping its lease alive is gone from the farm.
    #[arg(long, default_value_t = 10)]
    pub lease_ttl: i64,
}

pub async fn run(command: ServeCommand) -> Result<i32> {
    match command {
        ServeCommand::Coordinator(args) => coordinator(*args).await,
        ServeCommand::Worker(args) => worker(*args).await,
    }
}

async fn coordinator(args: CoordinatorArgs) -> Result<i32> {
    let etcd = args.etcd.config()?;
    if args.leader_ttl < Duration::from_secs(1) {
        bail!("--leader-ttl must be at least 1s");
    }
    // everything that can be refused is checked before campaigning: a leader that then
    // exited would keep the standbys waiting for its lease
    let mut config = CoordinatorConfig::new(args.artifacts.clone());
    config.limits = args.limits();
    config.checkpoint_every = args.checkpoint_every;
    config.access = access(args.tokens.as_deref(), args.listen)?;
    config.retain_finished = args.retain_finished;
    config.quotas = RankQuotas {
        default: args.max_ranks_per_owner,
        owners: args.owner_max_ranks.iter().cloned().collect(),
    };
    config.tls = args.tls.load(COORDINATOR_NAME)?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let announced = format!("{scheme}://{}", args.listen);
    let leadership = Leadership::campaign(&etcd, &announced, args.leader_ttl, |leader| {
        let leader = leader.unwrap_or_else(|| "another coordinator".into());
        let _ = ready(&format!(
            "coordinator standby: {leader} leads; this one takes over when it is gone"
        ));
    })
    .await?;
    let membership = EtcdMembership::connect(etcd.clone()).await?;
    let store = EtcdJobStore::connect(etcd)
        .await?
        .fenced(leadership.fence());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    let coordinator = Coordinator::start(config, Arc::new(membership), Arc::new(store)).await?;
    if let Some(address) = args.metrics.serve(coordinator.metrics()).await? {
        ready(&format!("coordinator metrics on http://{address}/metrics"))?;
    }
    // The listener is bound, so connections made after this line wait for `serve` to accept.
    ready(&format!("coordinator listening on {address}"))?;
    let lost = Arc::new(std::sync::Mutex::new(None));
    let shutdown = {
        let (lost, leadership_lost) = (lost.clone(), leadership.lost());
        async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                why = leadership_lost => *lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(why),
            }
        }
    };
    coordinator.serve(listener, shutdown).await?;
    let lost = lost.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(why) = lost {
        bail!(
            "this coordinator stopped leading: {why}. It exits so that its supervisor starts it \
             again, as a standby"
        );
    }
    leadership.resign().await;
    Ok(0)
}

/// The job API's access rule from `--tokens`; an open API on a non-loopback address is
/// allowed (a farm behind its own network boundary) but said out loud.
fn access(tokens: Option<&Path>, listen: SocketAddr) -> Result<Access> {
    let Some(path) = tokens else {
        if !listen.ip().is_loopback() {
            tracing::warn!(
                "the job API on {listen} has no tokens: anyone who reaches it can submit, see, \
                 cancel and fetch every job (start with --tokens FILE to require them)"
            );
        }
        return Ok(Access::Open);
    };
    let tokens = Tokens::load(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "the tokens file {} can be read by other users (mode {:o}): chmod 600 it",
                path.display(),
                mode & 0o777
            );
        }
    }
    tracing::info!("API tokens: {} from {}", tokens.len(), path.display());
    Ok(Access::Tokens(tokens))
}

async fn worker(args: WorkerArgs) -> Result<i32> {
    let mut etcd = args.etcd.config()?;
    if args.lease_ttl < 1 {
        bail!("--lease-ttl must be at least 1 second");
    }
    etcd.lease_ttl_s = args.lease_ttl;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let port = listener.local_addr()?.port();
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| advertise_default(args.listen));
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{port}", hostname()));
    let models = if args.models.is_empty() {
        vec![ModelSource::Toy]
    } else {
        args.models.clone()
    };
    let config = DaemonConfig {
        id: id.clone(),
        advertise_host: advertise.clone(),
        device: args.device.clone(),
        dtype: args.dtype.clone(),
        models,
        labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        mesh_timeouts: Timeouts::default(),
        reservation_timeout: Duration::from_secs(60),
        counters: Default::default(),
        tls: args.tls.load(WORKER_NAME)?,
        metrics: Default::default(),
    };
    let metrics_address = args.metrics.serve(config.metrics.clone()).await?;
    let membership: Arc<dyn Membership> = Arc::new(EtcdMembership::connect(etcd).await?);
    let mut daemon = tokio::spawn(daemon::run(
        config,
        membership.clone(),
        listener,
        shutdown_signal(),
    ));
    // Ready means registered: the coordinator can see this worker once the line is out.
    let registered = wait_registered(membership.as_ref(), &id);
    tokio::select! {
        outcome = &mut daemon => {
            outcome.context("the worker daemon panicked")??;
            bail!("worker {id} stopped before it registered");
        }
        seen = registered => seen?,
    }
    if let Some(address) = metrics_address {
        ready(&format!("worker {id} metrics on http://{address}/metrics"))?;
    }
    ready(&format!("worker {id} listening on {advertise}:{port}"))?;
    daemon.await.context("the worker daemon panicked")??;
    Ok(0)
}

async fn wait_registered(membership: &dyn Membership, id: &str) -> Result<()> {
    loop {
        if membership.list().await?.iter().any(|w| w.id == id) {
            return Ok(());
        }
        tokio::time::sleep(REGISTERED_POLL).await;
    }
}

/// Prints the ready line and flushes it: stdout is a pipe when a test or supervisor reads it.
fn ready(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn advertise_default(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        "127.0.0.1".into()
    } else {
        listen.ip().to_string()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}

fn parse_model(text: &str) -> Result<ModelSource, String> {
    match text {
        daemon::models::TOY => return Ok(ModelSource::Toy),
        daemon::models::TINY => return Ok(ModelSource::Tiny),
        _ => {}
    }
    match text.split_once('=') {
        Some((name, dir)) if !name.trim().is_empty() && !dir.trim().is_empty() => {
            Ok(ModelSource::Checkpoint {
                name: name.trim().to_string(),
                dir: PathBuf::from(dir.trim()),
            })
        }
        _ => Err(format!(
            "expected `toy`, `tiny` or NAME=DIR (a checkpoint directory served as NAME); got {text:?}"
        )),
    }
}

fn parse_quota(text: &str) -> Result<(String, usize), String> {
    let parsed = text
        .split_once('=')
        .and_then(|(owner, n)| Some((owner.trim(), n.trim().parse::<usize>().ok()?)))
        .filter(|(owner, _)| !owner.is_empty());
    match parsed {
        Some((owner, n)) => Ok((owner.to_string(), n)),
        None => Err(format!(
            "expected OWNER=N (N a number of workers); got {text:?}"
        )),
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.trim().to_string()))
        }
        _ => Err(format!("expected KEY=VALUE; got {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_and_labels_parse() {
        assert_eq!(parse_model("tiny"), Ok(ModelSource::Tiny));
        assert_eq!(parse_model("toy"), Ok(ModelSource::Toy));
        assert_eq!(
            parse_model("wan13=/m/Wan2.1"),
            Ok(ModelSource::Checkpoint {
                name: "wan13".into(),
                dir: "/m/Wan2.1".into()
            })
        );
        assert!(parse_model("/m/Wan2.1").is_err());
        assert!(parse_model("=/m").is_err());
        assert_eq!(
            parse_label("zone=eu-1"),
            Ok(("zone".to_string(), "eu-1".to_string()))
        );
        assert!(parse_label("zone").is_err());
        assert_eq!(parse_quota("studio-a=4"), Ok(("studio-a".to_string(), 4)));
        assert!(parse_quota("studio-a").is_err());
        assert!(parse_quota("=4").is_err());
        assert!(parse_quota("a=four").is_err());
    }

    #[test]
    fn the_advertised_host_defaults_to_the_listen_host_or_loopback() {
        assert_eq!(
            advertise_default("0.0.0.0:7071".parse().unwrap()),
            "127.0.0.1"
        );
        assert_eq!(
            advertise_default("10.0.0.5:7071".parse().unwrap()),
            "10.0.0.5"
        );
    }
}
