//! Running the `longtake` binary once and reading what it said: exit code, stdout, stderr, and
//! the JSON of `--json` output.

use std::process::Command;

use serde_json::Value;

/// The binary under test: cargo's, or `LONGTAKE_TEST_BIN` when set (a copy taken right after
/// the build, where several checkouts share one target directory and overwrite its binary).
pub fn longtake() -> Command {
    match std::env::var_os("LONGTAKE_TEST_BIN") {
        Some(path) => Command::new(path),
        None => Command::new(env!("CARGO_BIN_EXE_longtake")),
    }
}

/// One finished run of the CLI.
pub struct Run {
    pub args: Vec<String>,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Runs `cmd` to the end.
    pub fn of(mut cmd: Command, args: &[&str]) -> Run {
        let out = cmd
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run longtake {args:?}: {e}"));
        Run {
            args: args.iter().map(|a| a.to_string()).collect(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "longtake {} → exit {:?}\nstdout: {}\nstderr: {}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }

    /// Panics unless the run exited 0.
    pub fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "expected success: {}", self.describe());
        self
    }

    /// Asserts the contract's failure: exit 1 and exactly one `error:` line on stderr, which it
    /// returns.
    pub fn error_line(&self) -> String {
        assert_eq!(self.code, Some(1), "expected exit 1: {}", self.describe());
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "one error line expected: {}",
            self.describe()
        );
        lines[0].to_string()
    }

    /// The JSON values printed on stdout: a JSON array's elements, one object, or one value
    /// per line (the shapes `--json` may take for lists and event streams).
    pub fn json_values(&self) -> Vec<Value> {
        if let Ok(value) = serde_json::from_str::<Value>(&self.stdout) {
            return match value {
                Value::Array(items) => items,
                other => vec![other],
            };
        }
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{}", self.describe()))
            })
            .collect()
    }

    /// The single JSON object printed on stdout.
    pub fn json(&self) -> Value {
        let mut values = self.json_values();
        assert_eq!(
            values.len(),
            1,
            "one JSON value expected: {}",
            self.describe()
        );
        values.remove(0)
    }
}

/// The spec flags of a small tiny-model render (64×64, 9 frames) with `steps` steps.
pub fn spec(steps: u32) -> Vec<String> {
    spec_of("9", "64x64", steps)
}

/// The spec flags of a tiny-model render with these frames, size and steps (seed 7, 16 fps). The
/// cluster's workers serve `tiny` (`support::farm`), so the spec names it. The frame rate is
/// stated: an unset one is the model's default, filled in when the job is placed, and the
/// restart test compares a queued job's spec with the same job's after a restart.
pub fn spec_of(frames: &str, size: &str, steps: u32) -> Vec<String> {
    let steps = steps.to_string();
    [
        "--model",
        "tiny",
        "--prompt",
        "a wolf howling at the moon",
        "--frames",
        frames,
        "--fps",
        "16",
        "--size",
        size,
        "--seed",
        "7",
        "--steps",
        &steps,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Args as `&str`s for `Run::of`.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The embedded single-process render (no coordinator): the reference every farm render is
/// compared with.
pub fn embedded_render(args: &[&str]) -> Run {
    let mut cmd = longtake();
    cmd.env_remove("LONGTAKE_COORDINATOR");
    let mut all = vec!["render"];
    all.extend_from_slice(args);
    Run::of(cmd, &all).ok()
}

/// A string field of a JSON job or worker.
pub fn field<'a>(value: &'a Value, name: &str) -> &'a str {
    value[name]
        .as_str()
        .unwrap_or_else(|| panic!("no string field {name:?} in {value}"))
}

/// A numeric field of a JSON job or worker.
pub fn number(value: &Value, name: &str) -> u64 {
    value[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric field {name:?} in {value}"))
}
