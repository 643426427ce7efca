//! What arrived of a remote's numbered `data` messages (protocol version 2).
//!
//! A crsync sender numbers every `data` message of a session and marks the
//! first number of each stream run (a stream that restarts begins a new
//! run). A receiver acknowledges the highest number up to which the current
//! run arrived without a hole. Ranges alone cannot show the loss of a batch
//! whose changes no range covers (another site's changes, relayed to a
//! receiver that believes us only about ourselves), so the sender counts a
//! batch as delivered only when both its ranges and its number are
//! acknowledged.

use std::collections::BTreeSet;

/// Numbers received ahead of a hole, kept at most; later ones are forgotten
/// (the sender sends them again after its acknowledgement timeout).
const MAX_AHEAD: usize = 1024;

/// The receiving side's count of one remote's current stream run.
///
/// ```
/// use crsync_peer::proto::ReceivedRun;
/// let mut run = ReceivedRun::default();
/// assert_eq!(run.received(), None);
/// run.note(1, 1);
/// run.note(1, 3); // 2 is missing (lost, or still on its way)
/// assert_eq!(run.received(), Some(1));
/// run.note(1, 2);
/// assert_eq!(run.received(), Some(3));
/// run.note(7, 7); // the sender restarted its stream at 7
/// assert_eq!(run.received(), Some(7));
/// run.note(1, 4); // a late message of the old run counts for nothing
/// assert_eq!(run.received(), Some(7));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ReceivedRun {
    /// The first number of the current run (0: nothing received yet).
    first: u64,
    /// Every number of the run in `first..=contiguous` arrived.
    contiguous: u64,
    ahead: BTreeSet<u64>,
}

impl ReceivedRun {
    /// Message `n` of the run that began at `first` arrived and was taken.
    pub fn note(&mut self, first: u64, n: u64) {
        if first == 0 || n < first || first < self.first {
            return;
        }
        if first > self.first {
            self.first = first;
            self.contiguous = first - 1;
            self.ahead.retain(|&k| k >= first);
        }
        if n == self.contiguous + 1 {
            self.contiguous = n;
            while self.ahead.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
            self.ahead.retain(|&k| k > self.contiguous);
        } else if n > self.contiguous && self.ahead.len() < MAX_AHEAD {
            self.ahead.insert(n);
        }
    }

    /// Whether every message of its run before message `n` (of the run that
    /// began at `first`) arrived: what `n` claims may rest on them (a
    /// batch's ranges vouch for it and the batches of its run before it).
    /// A message of a run older than the current one follows nothing.
    ///
    /// ```
    /// use crsync_peer::proto::ReceivedRun;
    /// let mut run = ReceivedRun::default();
    /// assert!(run.follows_all_before(1, 1) && !run.follows_all_before(1, 2));
    /// run.note(1, 1);
    /// assert!(run.follows_all_before(1, 2) && !run.follows_all_before(1, 3));
    /// assert!(run.follows_all_before(5, 5)); // a new run stands on its own
    /// ```
    pub fn follows_all_before(&self, first: u64, n: u64) -> bool {
        if first == 0 || n < first {
            return true; // not a number note() counts: nothing to wait for
        }
        match first.cmp(&self.first) {
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Greater => n == first,
            std::cmp::Ordering::Equal => n <= self.contiguous + 1,
        }
    }

    /// Whether message `n` of the run that began at `first` is the current
    /// run's and every message up to it arrived.
    pub fn arrived_through(&self, first: u64, n: u64) -> bool {
        first == self.first && first > 0 && n >= first && n <= self.contiguous
    }

    /// Whether `first` began a run older than the current one.
    pub fn is_past(&self, first: u64) -> bool {
        first < self.first
    }

    /// The highest number up to which the current run arrived without a
    /// hole; `None` before its first message.
    pub fn received(&self) -> Option<u64> {
        (self.first > 0 && self.contiguous >= self.first).then_some(self.contiguous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the order and duplicates, `received` is the end of the
        /// longest run of numbers from the start that all arrived.
        #[test]
        fn received_is_the_end_of_the_hole_free_prefix(
            arrived in proptest::collection::vec(1u64..40, 0..80),
        ) {
            let mut run = ReceivedRun::default();
            for &n in &arrived {
                run.note(1, n);
            }
            let mut expected = 0;
            while arrived.contains(&(expected + 1)) {
                expected += 1;
            }
            prop_assert_eq!(run.received(), (expected > 0).then_some(expected));
        }
    }

    #[test]
    fn a_new_run_forgets_the_hole_of_the_old_one() {
        let mut run = ReceivedRun::default();
        run.note(1, 1);
        run.note(1, 3);
        run.note(4, 5);
        assert_eq!(run.received(), None, "4 not yet arrived");
        run.note(4, 4);
        assert_eq!(run.received(), Some(5));
    }
}
