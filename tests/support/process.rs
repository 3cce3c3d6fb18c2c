//! Child processes owned by a test: their stdout and stderr are kept (for the ready lines of the
//! CLI contract and for failure messages), and they are killed when the handle drops, so a
//! failing test leaves no coordinator or worker behind.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Output kept per stream; older text is dropped so a chatty process cannot fill the memory.
const KEEP_BYTES: usize = 64 * 1024;

/// A running child process and everything it has printed so far.
pub struct Proc {
    name: String,
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    exited: Option<ExitStatus>,
}

fn capture(stream: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&text);
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut text = sink.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
            if text.len() > KEEP_BYTES {
                let mut cut = text.len() - KEEP_BYTES / 2;
                while !text.is_char_boundary(cut) {
                    cut += 1;
                }
                text.replace_range(..cut, "[...]\n");
            }
        }
    });
    text
}

impl Proc {
    /// Starts `cmd` with piped output; `name` is how failure messages call it.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let stdout = capture(child.stdout.take().expect("piped stdout"));
        let stderr = capture(child.stderr.take().expect("piped stderr"));
        Proc {
            name: name.to_string(),
            child,
            stdout,
            stderr,
            exited: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Both streams, labelled, for a failure message.
    pub fn logs(&self) -> String {
        let state = match self.exited {
            Some(status) => format!("exited: {status}"),
            None => "running".to_string(),
        };
        format!(
            "--- {} ({state}) stdout ---\n{}--- {} stderr ---\n{}",
            self.name,
            self.stdout(),
            self.name,
            self.stderr()
        )
    }

    /// The exit status if the process has ended.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("poll a child process");
        }
        self.exited
    }

    /// Waits for the first stdout line starting with `prefix` and returns the rest of it (e.g.
    /// `coordinator listening on ` → `127.0.0.1:40123`). Panics with the process's output if it
    /// exits first or the line does not come within `timeout`.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .stdout()
                .lines()
                .find_map(|l| l.strip_prefix(prefix).map(|rest| rest.trim().to_string()));
            if let Some(rest) = found {
                return rest;
            }
            if let Some(status) = self.try_exit() {
                // The reader threads may still hold the last lines.
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "{} exited ({status}) before printing {prefix:?}\n{}",
                    self.name,
                    self.logs()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "hang guard ({timeout:?}): {} did not print {prefix:?}\n{}",
                    self.name,
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM (the graceful stop of the CLI contract).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -TERM {} failed", self.name);
    }

    /// SIGKILL, then reaps the process.
    pub fn kill(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            self.exited = Some(self.child.wait().expect("reap a killed child"));
        }
    }

    /// Waits for the process to end by itself; panics with its output after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                // Let the reader threads drain what was printed last.
                thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "hang guard ({timeout:?}): {} still running after it was expected to end\n{}",
                    self.name,
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
