//! bd3's launch backends, shared by the `bd3` command line (src/main.rs) and the tests that start
//! multi-process jobs. The trainer itself knows nothing about how it was started: it reads its
//! rank from the environment the backend set up (trainer::dist).

pub mod local;
pub mod report;

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// A spinner with the elapsed time for long work of unknown length, on stderr when it is a
/// terminal (hidden otherwise, so logs and pipes stay clean).
pub fn spinner(message: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner().with_message(message.to_string());
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("a valid template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A bar over `total` items of `what`, with rate and ETA, on a terminal only.
pub fn counter(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let template = format!("[{{bar:30}}] {{pos}}/{{len}} {what}  {{per_sec}}  ETA {{eta}}");
    bar.set_style(ProgressStyle::with_template(&template).expect("a valid template").progress_chars("=> "));
    bar
}
