//! Initial-sync progress on stderr: a bar (indicatif) on a terminal, plain
//! lines otherwise (one when a stream's total is known, one every few
//! seconds, one at its end), so logs of a non-interactive run still say how
//! far it came.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use crsync::{Progress, RemoteStatus, SyncPhase};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Pause between two plain progress lines.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// Which initial stream a line or bar is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Download,
    Upload,
}

impl Direction {
    fn verb(self, done: bool) -> &'static str {
        match (self, done) {
            (Direction::Download, false) => "downloading",
            (Direction::Download, true) => "downloaded",
            (Direction::Upload, false) => "uploading",
            (Direction::Upload, true) => "uploaded",
        }
    }
}

/// Shows one remote's initial download and upload as they go.
pub(crate) struct ProgressReport {
    terminal: bool,
    bar: Option<(Direction, ProgressBar)>,
    /// The stream of the last plain line, and when it was printed.
    last_line: Option<(Direction, Instant)>,
    finished: Vec<Direction>,
}

impl ProgressReport {
    /// A bar if stderr is a terminal, plain lines otherwise.
    pub(crate) fn new() -> Self {
        ProgressReport {
            terminal: std::io::stderr().is_terminal(),
            bar: None,
            last_line: None,
            finished: Vec::new(),
        }
    }

    /// Shows where `remote`'s initial streams stand now.
    pub(crate) fn update(&mut self, remote: &RemoteStatus) {
        for (direction, progress) in [
            (Direction::Download, remote.download),
            (Direction::Upload, remote.upload),
        ] {
            let Some(total) = progress.total.filter(|t| *t > 0) else {
                continue;
            };
            if self.finished.contains(&direction) {
                continue;
            }
            let complete = progress.done >= total
                && (direction == Direction::Upload || remote.phase != SyncPhase::InitialDownload);
            if self.terminal {
                self.draw(direction, progress, total);
            } else {
                self.line(direction, progress, total, complete);
            }
            if complete {
                self.finish(direction);
            }
        }
    }

    fn draw(&mut self, direction: Direction, progress: Progress, total: u64) {
        if self.bar.as_ref().is_none_or(|(d, _)| *d != direction) {
            if let Some((_, old)) = self.bar.take() {
                old.finish();
            }
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix:>11} [{bar:20}] {pos}/{len} changes {per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(direction.verb(false));
            self.bar = Some((direction, bar));
        }
        if let Some((_, bar)) = &self.bar {
            bar.set_length(total);
            bar.set_position(progress.done.min(total));
        }
    }

    fn line(&mut self, direction: Direction, progress: Progress, total: u64, complete: bool) {
        let due = match self.last_line {
            Some((d, at)) => d != direction || at.elapsed() >= PLAIN_EVERY,
            None => true,
        };
        if !due && !complete {
            return;
        }
        let percent = progress.fraction().unwrap_or(0.0) * 100.0;
        let mut line = format!(
            "{} {}/{total} changes ({percent:.0}%)",
            direction.verb(complete),
            progress.done.min(total)
        );
        if progress.per_second > 0.0 {
            line.push_str(&format!(", {:.0} changes/s", progress.per_second));
            if !complete {
                let left = total.saturating_sub(progress.done) as f64 / progress.per_second;
                line.push_str(&format!(", ETA {left:.0}s"));
            }
        }
        eprintln!("{line}");
        self.last_line = Some((direction, Instant::now()));
    }

    fn finish(&mut self, direction: Direction) {
        self.finished.push(direction);
        if let Some((d, bar)) = &self.bar {
            if *d == direction {
                bar.set_prefix(direction.verb(true));
                bar.finish();
                self.bar = None;
            }
        }
    }

    /// Ends a bar still drawn (the sync stopped early).
    pub(crate) fn abandon(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.abandon();
        }
    }
}
