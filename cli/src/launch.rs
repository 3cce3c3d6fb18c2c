//! The local launcher of `longtake render --layout ...`: starts one `longtake rank` process per
//! rank of the layout, joins them into a TCP mesh on loopback, shows rank 0's progress, and
//! stops the whole job with one line naming the rank when any of them fails.
//!
//! Protocol with a rank, line by line:
//! - the rank binds 127.0.0.1:0 and prints `port N` on stdout (no port is chosen ahead, so two
//!   jobs cannot race for one);
//! - once every rank has reported, the launcher writes all addresses, comma-separated in rank
//!   order, as one line on each rank's stdin;
//! - the rank then prints `progress encoded TOTAL`, `progress step INDEX TOTAL SECONDS` and
//!   `progress decoding`; rank 0's other stdout lines and its stderr are passed through, other
//!   ranks' stderr is kept to explain a failure.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use longtake_worker::model::loader::Checkpoint;
use longtake_worker::model::pipeline::tiny_configs;
use longtake_worker::model::tokenizer::PromptTokenizer;
use longtake_worker::model::wan::transformer::Config;
use longtake_worker::parallel::layout::{Layout, LayoutLimits};

use crate::render::{prepare, RenderArgs, StepDisplay};

/// How long the other ranks get to exit on their own after the first failure, so that the rank
/// that failed first, not one that lost its peer, is named.
const GRACE: Duration = Duration::from_millis(700);

enum Event {
    Stdout(usize, String),
    Stderr(usize, String),
    Closed,
}

/// Where a rank is in the job, from its progress lines.
#[derive(Clone, Copy)]
enum Phase {
    Starting,
    Denoising { done: usize, total: usize },
    Decoding,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Phase::Starting => write!(f, "while starting"),
            Phase::Denoising { done, total } if done < total => {
                write!(f, "during step {} of {total}", done + 1)
            }
            Phase::Denoising { .. } => write!(f, "after the last step"),
            Phase::Decoding => write!(f, "while decoding"),
        }
    }
}

struct Rank {
    child: Child,
    stdin: Option<ChildStdin>,
    port: Option<u16>,
    phase: Phase,
    /// The last lines of its stderr.
    stderr: VecDeque<String>,
    exit: Option<ExitStatus>,
    /// Whether the launcher killed it (then it is not a cause).
    killed: bool,
}

impl Rank {
    /// The error line the rank printed last, if any.
    fn error_line(&self) -> Option<&str> {
        self.stderr
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .or_else(|| self.stderr.back().map(String::as_str))
    }

    /// Whether its error only reports a peer that went away (then it is not the cause).
    fn lost_a_peer(&self) -> bool {
        self.error_line()
            .is_some_and(|l| l.contains("lost in") || l.contains("timed out"))
    }
}

/// The transformer configuration of `--model`, for checking the layout before starting.
fn transformer_config(model: &str) -> Result<Config> {
    if model == "tiny" {
        let tokenizer = PromptTokenizer::builtin_tiny()?;
        return Ok(tiny_configs(tokenizer.vocab_size())?.transformer);
    }
    Ok(Checkpoint::open(model)?
        .component("transformer")?
        .config()?)
}

pub fn run(args: &RenderArgs, layout_text: &str, launch_args: Vec<OsString>) -> Result<i32> {
    let layout: Layout = layout_text.parse().map_err(|e| anyhow!("--layout: {e}"))?;
    let config = transformer_config(args.model())?;
    layout
        .validate(&LayoutLimits::for_transformer(
            &config,
            args.guidance() > 1.0,
        ))
        .map_err(|e| anyhow!("--layout {layout}: {e}"))?;
    // The same checks as the ranks make, once, before any process starts.
    let prepared = prepare(args, true)?;
    let world = layout.world_size();
    eprintln!("layout {layout}: starting {world} local processes");

    let exe = std::env::current_exe().context("cannot find the longtake binary")?;
    let (tx, rx) = mpsc::channel();
    let mut ranks = Vec::with_capacity(world);
    for rank in 0..world {
        let spawned = Command::new(&exe)
            .arg("rank")
            .arg("--rank")
            .arg(rank.to_string())
            .args(&launch_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                kill_all(&mut ranks);
                bail!("cannot start rank {rank}: {e}");
            }
        };
        let stdin = child.stdin.take();
        if let Some(out) = child.stdout.take() {
            forward(BufReader::new(out), rank, tx.clone(), Event::Stdout, true);
        }
        if let Some(err) = child.stderr.take() {
            forward(BufReader::new(err), rank, tx.clone(), Event::Stderr, false);
        }
        ranks.push(Rank {
            child,
            stdin,
            port: None,
            phase: Phase::Starting,
            stderr: VecDeque::new(),
            exit: None,
            killed: false,
        });
    }
    drop(tx);

    let mut display: Option<StepDisplay> = None;
    let mut peers_sent = false;
    let mut failed_at: Option<Instant> = None;
    loop {
        // Drain what the ranks said.
        while let Ok(event) = rx.recv_timeout(Duration::from_millis(20)) {
            match event {
                Event::Stdout(rank, line) => {
                    on_stdout(&mut ranks[rank], rank, &line, &mut display, prepared.frames)
                }
                Event::Stderr(rank, line) => {
                    if rank == 0 && !line.starts_with("error: ") {
                        eprintln!("{line}");
                    }
                    let buf = &mut ranks[rank].stderr;
                    buf.push_back(line);
                    if buf.len() > 20 {
                        buf.pop_front();
                    }
                }
                Event::Closed => {}
            }
        }
        if !peers_sent && ranks.iter().all(|r| r.port.is_some()) {
            let line = ranks
                .iter()
                .map(|r| format!("127.0.0.1:{}", r.port.unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",");
            for r in &mut ranks {
                if let Some(mut stdin) = r.stdin.take() {
                    // A rank that is already gone shows up below as a failed exit.
                    let _ = writeln!(stdin, "{line}");
                }
            }
            peers_sent = true;
        }
        for r in &mut ranks {
            if r.exit.is_none() {
                r.exit = r.child.try_wait().context("waiting for a rank")?;
            }
        }
        if failed_at.is_none() && ranks.iter().any(|r| r.exit.is_some_and(|s| !s.success())) {
            failed_at = Some(Instant::now());
        }
        if let Some(at) = failed_at {
            let all_out = ranks.iter().all(|r| r.exit.is_some());
            if all_out || at.elapsed() >= GRACE {
                kill_all(&mut ranks);
                drain(&rx, &mut ranks);
                if let Some(d) = &display {
                    d.clear();
                }
                bail!("{}", failure_line(&ranks));
            }
        } else if ranks.iter().all(|r| r.exit.is_some()) {
            drain(&rx, &mut ranks);
            return Ok(0);
        }
    }
}

/// Reads lines of a rank's pipe on a thread of its own.
fn forward(
    reader: impl BufRead + Send + 'static,
    rank: usize,
    tx: mpsc::Sender<Event>,
    wrap: fn(usize, String) -> Event,
    report_close: bool,
) {
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if tx.send(wrap(rank, line)).is_err() {
                return;
            }
        }
        if report_close {
            let _ = tx.send(Event::Closed);
        }
    });
}

fn on_stdout(
    r: &mut Rank,
    rank: usize,
    line: &str,
    display: &mut Option<StepDisplay>,
    frames: usize,
) {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["port", port] => r.port = port.parse().ok(),
        ["progress", "encoded", total] => {
            let total = total.parse().unwrap_or(0);
            r.phase = Phase::Denoising { done: 0, total };
            if rank == 0 {
                *display = Some(StepDisplay::new(total));
            }
        }
        ["progress", "step", index, total, secs] => {
            let (index, total) = (index.parse().unwrap_or(0), total.parse().unwrap_or(0));
            r.phase = Phase::Denoising {
                done: index + 1,
                total,
            };
            if let (0, Some(d)) = (rank, display.as_ref()) {
                d.step(index, total, secs.parse().unwrap_or(0.0));
            }
        }
        ["progress", "decoding"] => {
            r.phase = Phase::Decoding;
            if let (0, Some(d)) = (rank, display.as_ref()) {
                d.decoding(frames);
            }
        }
        _ if rank == 0 => println!("{line}"),
        _ => {}
    }
}

fn kill_all(ranks: &mut [Rank]) {
    for r in ranks.iter_mut() {
        if r.exit.is_none() {
            r.exit = r.child.try_wait().ok().flatten();
        }
        if r.exit.is_none() {
            r.killed = r.child.kill().is_ok();
        }
    }
    for r in ranks.iter_mut() {
        if r.exit.is_none() {
            r.exit = r.child.wait().ok();
        }
    }
}

/// Collects the last lines of the ranks' pipes (they close once the processes are gone).
fn drain(rx: &mpsc::Receiver<Event>, ranks: &mut [Rank]) {
    let deadline = Instant::now() + Duration::from_millis(500);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(Event::Stderr(rank, line)) => ranks[rank].stderr.push_back(line),
            Ok(Event::Stdout(0, line))
                if !line.starts_with("progress ") && !line.starts_with("port ") =>
            {
                println!("{line}")
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

/// One line naming the rank that failed first and why.
fn failure_line(ranks: &[Rank]) -> String {
    let failed: Vec<(usize, &Rank, ExitStatus)> = ranks
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.exit.filter(|s| !s.success()).map(|s| (i, r, s)))
        .filter(|(_, r, _)| !r.killed)
        .collect();
    // A rank killed by a signal, then one with its own error, then any.
    let culprit = failed
        .iter()
        .find(|(_, _, s)| s.signal().is_some())
        .or_else(|| failed.iter().find(|(_, r, _)| !r.lost_a_peer()))
        .or_else(|| failed.first());
    let Some(&(rank, r, status)) = culprit else {
        return "a rank failed".into();
    };
    let how = match (status.code(), status.signal()) {
        (_, Some(sig)) => format!("exited with signal {sig}{}", signal_name(sig)),
        (Some(code), _) => format!("exited with status {code}"),
        _ => "exited".into(),
    };
    match r.error_line() {
        Some(err) if status.signal().is_none() => format!("rank {rank} {how} {}: {err}", r.phase),
        _ => format!("rank {rank} {how} {}", r.phase),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        6 => " (SIGABRT)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        15 => " (SIGTERM)",
        _ => "",
    }
}
