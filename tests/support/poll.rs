//! Waiting with a deadline instead of sleeping and hoping: a probe is asked again and again until
//! it succeeds or the time is up, and the failure says what was expected and what was seen last.

use std::thread;
use std::time::{Duration, Instant};

/// How often a probe is asked again.
const EVERY: Duration = Duration::from_millis(150);

/// The shortest hang guard a wait may have: a wait's deadline only turns a hang into a failure,
/// it never checks speed (speed belongs in the benchmarks).
pub const MIN_HANG_GUARD: Duration = Duration::from_secs(30);

/// Asks `probe` until it returns `Ok` or `timeout` (a hang guard, at least [`MIN_HANG_GUARD`])
/// has passed. `Err(seen)` from the probe says what it saw; the error returned after the
/// deadline quotes `what` and the last `seen`.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    assert!(
        timeout >= MIN_HANG_GUARD,
        "a wait's deadline is a hang guard of at least {MIN_HANG_GUARD:?}, not {timeout:?}"
    );
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return Ok(value),
            Err(seen) if Instant::now() >= deadline => {
                return Err(format!(
                    "hang guard ({timeout:?}): expected {what}; last seen: {seen}"
                ))
            }
            Err(_) => thread::sleep(EVERY),
        }
    }
}
