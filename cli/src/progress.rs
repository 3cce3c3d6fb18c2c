//! A job's progress on stderr while it is watched: a step bar with an ETA on a terminal, one line
//! per event otherwise (logs, CI, scripts reading stderr).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use longtake_proto::{job_event, JobEvent};

use crate::views::printable;

/// Shows the events of one job as they come.
pub struct JobDisplay {
    bar: Option<ProgressBar>,
    interactive: bool,
    encoding_shown: bool,
    /// The last step's bytes each worker group sent to its neighbours (jobs of several groups).
    exchange: Vec<u64>,
}

impl Default for JobDisplay {
    fn default() -> Self {
        Self::new(std::io::stderr().is_terminal())
    }
}

impl JobDisplay {
    /// `interactive`: draw a bar (on a terminal) rather than print a line per step.
    pub fn new(interactive: bool) -> Self {
        Self {
            bar: None,
            interactive,
            encoding_shown: false,
            exchange: Vec::new(),
        }
    }

    pub fn show(&mut self, event: &JobEvent) {
        if let Some(line) = self.update(event) {
            match &self.bar {
                Some(bar) => bar.println(line),
                None => eprintln!("{line}"),
            }
        }
    }

    /// Moves the bar for `event` and returns the line to print for it, if any.
    fn update(&mut self, event: &JobEvent) -> Option<String> {
        use job_event::Event;
        match event.event.as_ref()? {
            Event::Queued(q) => {
                self.clear();
                let ahead = match q.position {
                    0 => "next in line".to_string(),
                    1 => "1 job ahead".to_string(),
                    n => format!("{n} jobs ahead"),
                };
                Some(if q.reason.is_empty() {
                    format!("queued ({ahead})")
                } else {
                    format!("queued ({ahead}): {}", printable(&q.reason))
                })
            }
            Event::Planned(p) => {
                self.clear();
                let layout = if p.layout.is_empty() {
                    String::new()
                } else {
                    format!(", layout {}", p.layout)
                };
                let windows = if p.windows.is_empty() {
                    String::new()
                } else {
                    format!("\nwindows: {}", p.windows)
                };
                Some(format!(
                    "planned on {} (attempt {}{layout}){windows}",
                    p.workers.join(", "),
                    p.attempt
                ))
            }
            Event::Step(s) if s.step == 0 => {
                self.clear();
                Some(format!(
                    "running: loading the model and encoding the prompts ({} steps to go)",
                    s.total
                ))
            }
            Event::Step(s) => {
                if !s.group_exchange_bytes.is_empty() {
                    self.exchange = s.group_exchange_bytes.clone();
                }
                if self.interactive {
                    let bar = self.bar.get_or_insert_with(|| step_bar(s.total));
                    bar.set_length(s.total as u64);
                    if s.step == 1 {
                        // The ETA is the rate of denoising steps, not of model loading.
                        bar.reset_eta();
                    }
                    bar.set_position(s.step as u64);
                    None
                } else if s.elapsed_s == 0.0 && s.step_s == 0.0 {
                    // A watch that joins a running job starts with its state, without timings.
                    Some(format!("running: step {}/{}", s.step, s.total))
                } else {
                    Some(format!(
                        "step {}/{} ({:.1} s, {:.2} s/step)",
                        s.step, s.total, s.elapsed_s, s.step_s
                    ))
                }
            }
            Event::Decoding(d) => {
                self.clear();
                let exchange = if self.exchange.is_empty() {
                    String::new()
                } else {
                    let groups: Vec<String> = self
                        .exchange
                        .iter()
                        .enumerate()
                        .map(|(g, &b)| format!("group {g} {:.1} KiB", b as f64 / 1024.0))
                        .collect();
                    format!(
                        "exchanged between worker groups per step (each rank): {}\n",
                        groups.join(", ")
                    )
                };
                Some(format!("{exchange}decoding {} frames", d.frames))
            }
            Event::Encoding(e) => {
                // Encoding reports every batch; a line each would drown the log.
                if self.encoding_shown {
                    return None;
                }
                self.encoding_shown = true;
                Some(format!("encoding {} frames", e.frames_total))
            }
            Event::Done(d) => {
                self.clear();
                let split = match &d.time_split {
                    Some(t) => format!("\ntime: {}", crate::views::time_split_text(t)),
                    None => String::new(),
                };
                Some(format!(
                    "done: {} bytes, rendered in {:.1} s{split}",
                    d.output_bytes, d.render_s
                ))
            }
            Event::Failed(f) => {
                self.clear();
                Some(format!("failed: {}", printable(&f.reason)))
            }
            Event::Cancelled(c) => {
                self.clear();
                Some(format!("cancelled: {}", printable(&c.reason)))
            }
        }
    }

    /// Removes the bar (before a line that ends its phase, or when the watch ends).
    pub fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn step_bar(total: u32) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {pos}/{len} steps  {elapsed} elapsed, ETA {eta}",
        )
        .expect("static progress template")
        .progress_chars("=> "),
    );
    bar.set_message("denoising");
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use longtake_proto::{Encoding, Queued, Step};

    fn event(e: job_event::Event) -> JobEvent {
        JobEvent {
            event: Some(e),
            ..Default::default()
        }
    }

    #[test]
    fn one_line_per_step_off_a_terminal_and_encoding_once() {
        let mut display = JobDisplay::new(false);
        let step = display.update(&event(job_event::Event::Step(Step {
            step: 3,
            total: 3,
            elapsed_s: 1.25,
            step_s: 0.4,
            group_exchange_bytes: vec![2048, 4096],
            ..Default::default()
        })));
        assert_eq!(step.as_deref(), Some("step 3/3 (1.2 s, 0.40 s/step)"));
        let decoding = display.update(&event(job_event::Event::Decoding(
            longtake_proto::Decoding { frames: 9 },
        )));
        assert_eq!(
            decoding.as_deref(),
            Some(
                "exchanged between worker groups per step (each rank): group 0 2.0 KiB, group 1 \
                 4.0 KiB\ndecoding 9 frames"
            )
        );
        let encoding = |n| {
            event(job_event::Event::Encoding(Encoding {
                frames_written: n,
                frames_total: 9,
            }))
        };
        assert!(display.update(&encoding(4)).is_some());
        assert!(display.update(&encoding(9)).is_none());
        let queued = display.update(&event(job_event::Event::Queued(Queued {
            position: 2,
            reason: String::new(),
        })));
        assert_eq!(queued.as_deref(), Some("queued (2 jobs ahead)"));
        let running = display.update(&event(job_event::Event::Step(Step {
            step: 0,
            total: 3,
            ..Default::default()
        })));
        assert!(running.unwrap().starts_with("running: loading the model"));
        let joined = display.update(&event(job_event::Event::Step(Step {
            step: 2,
            total: 3,
            ..Default::default()
        })));
        assert_eq!(joined.as_deref(), Some("running: step 2/3"));
    }

    #[test]
    fn steps_move_the_bar_on_a_terminal() {
        let mut display = JobDisplay::new(true);
        let line = display.update(&event(job_event::Event::Step(Step {
            step: 2,
            total: 5,
            ..Default::default()
        })));
        assert!(line.is_none());
        let bar = display.bar.as_ref().unwrap();
        assert_eq!((bar.position(), bar.length()), (2, Some(5)));
        display.clear();
        assert!(display.bar.is_none());
    }
}
