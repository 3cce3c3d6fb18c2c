//! Reading a daemon's `/metrics` as Prometheus does: one plain HTTP GET, the body parsed by a
//! Prometheus text-format parser (`prometheus-parse`), and checked by `promtool check metrics`
//! (Debian's `prometheus` package, installed by `tests/setup.sh`).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use prometheus_parse::{Scrape, Value};

/// One scrape of `url` (`http://HOST:PORT/metrics`): the body and its samples.
pub fn scrape(url: &str) -> (String, Scrape) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("not an http:// URL: {url}"));
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host)
        .unwrap_or_else(|e| panic!("cannot connect to the metrics endpoint {url}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP reply from {url}: {reply}"));
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "the text exposition format: {head}"
    );
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = Scrape::parse(lines).unwrap_or_else(|e| panic!("unparsable metrics: {e}\n{body}"));
    (body.to_string(), parsed)
}

/// The value of sample `name` whose labels include `labels` (a histogram's count and sum are
/// the samples `NAME_count` and `NAME_sum`); `None` when there is no such sample.
pub fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(_) | Value::Summary(_) => f64::NAN,
        })
}

/// `promtool check metrics` (Prometheus's own parser and naming lint) on `body`: what it said,
/// starting `promtool failed` when it refused. Panics with how to install it when it is not.
pub fn promtool_check(body: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install it with tests/setup.sh (Debian: apt-get install prometheus)")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        said
    } else {
        format!("promtool failed: {said}")
    }
}
