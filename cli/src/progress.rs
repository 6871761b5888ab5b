//! Progress of long operations (`session create --wait`, `node drain`,
//! `cluster add`), on stderr, through indicatif.
//!
//! One rule for every command ([`interactive`]): progress is drawn only when
//! stderr is a terminal and the output is text. Under `--output json`, or
//! when stderr is a pipe or a file, nothing is drawn and a [`Progress`] is a
//! no-op, so scripts see only the result.

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::output::OutputFormat;

/// How often a spinner turns.
const TICK: Duration = Duration::from_millis(120);

/// Whether to draw progress: text output and stderr on a terminal.
pub fn interactive(output: OutputFormat) -> bool {
    show_progress(output, std::io::stderr().is_terminal())
}

/// The rule itself: progress only for text output on a terminal.
pub fn show_progress(output: OutputFormat, stderr_is_terminal: bool) -> bool {
    output == OutputFormat::Text && stderr_is_terminal
}

/// A spinner or a bar on stderr, or nothing when not [`interactive`].
#[derive(Debug)]
pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// Draws nothing.
    pub fn hidden() -> Self {
        Self(None)
    }

    /// A spinner with `message`, when `output` is interactive.
    pub fn spinner(output: OutputFormat, message: impl Into<String>) -> Self {
        if !interactive(output) {
            return Self::hidden();
        }
        let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb.set_message(message.into());
        pb.enable_steady_tick(TICK);
        Self(Some(pb))
    }

    /// A bar of `total` steps with `message`, when `output` is interactive.
    pub fn bar(output: OutputFormat, total: u64, message: impl Into<String>) -> Self {
        if !interactive(output) {
            return Self::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_message(message.into());
        pb.enable_steady_tick(TICK);
        Self(Some(pb))
    }

    /// Whether anything is drawn (callers skip the work of feeding a hidden one).
    pub fn is_shown(&self) -> bool {
        self.0.is_some()
    }

    /// Replaces the message.
    pub fn set_message(&self, message: impl Into<String>) {
        if let Some(pb) = &self.0 {
            pb.set_message(message.into());
        }
    }

    /// Sets the bar's position and total.
    pub fn set(&self, position: u64, total: u64) {
        if let Some(pb) = &self.0 {
            pb.set_length(total);
            pb.set_position(position.min(total));
        }
    }

    /// Removes the spinner or bar from the terminal.
    pub fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_only_for_text_on_a_terminal() {
        assert!(show_progress(OutputFormat::Text, true));
        assert!(!show_progress(OutputFormat::Json, true));
        assert!(!show_progress(OutputFormat::Text, false));
        assert!(!show_progress(OutputFormat::Json, false));
        // Under a test harness stderr is captured: nothing is drawn, calls are no-ops.
        let p = Progress::hidden();
        p.set(3, 5);
        p.set_message("x");
        assert!(!p.is_shown());
    }
}
