//! [`Connections`]: caps on open streams per token and in total.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::auth::Principal;

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Full {
    #[error("this token already has {0} open connections (the limit)")]
    Token(usize),
    #[error("the server already has {0} open connections (the limit)")]
    Server(usize),
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_key: HashMap<Principal, usize>,
}

/// Open connections, counted per token and in total.
pub(crate) struct Connections {
    max_total: usize,
    max_per_key: usize,
    counts: Arc<Mutex<Counts>>,
}

/// One open connection; dropping it frees the slot.
#[must_use = "the slot is freed when the permit is dropped"]
pub(crate) struct ConnectionPermit {
    counts: Arc<Mutex<Counts>>,
    key: Principal,
}

impl std::fmt::Debug for ConnectionPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionPermit")
            .field("key", &self.key)
            .finish()
    }
}

fn lock(counts: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    counts.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Connections {
    pub(crate) fn new(max_total: usize, max_per_key: usize) -> Self {
        Connections {
            max_total,
            max_per_key,
            counts: Arc::default(),
        }
    }

    /// Takes a slot for `key`, or says which cap is reached.
    pub(crate) fn acquire(&self, key: Principal) -> Result<ConnectionPermit, Full> {
        let mut counts = lock(&self.counts);
        let mine = counts.per_key.get(&key).copied().unwrap_or(0);
        if mine >= self.max_per_key {
            return Err(Full::Token(self.max_per_key));
        }
        if counts.total >= self.max_total {
            return Err(Full::Server(self.max_total));
        }
        counts.total += 1;
        counts.per_key.insert(key, mine + 1);
        Ok(ConnectionPermit {
            counts: Arc::clone(&self.counts),
            key,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.per_key.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_key_and_total_and_slots_come_back() {
        let c = Connections::new(3, 2);
        let a = Principal::of_grant(1);
        let b = Principal::of_grant(2);
        let a1 = c.acquire(a).expect("first");
        let _a2 = c.acquire(a).expect("second");
        assert_eq!(c.acquire(a).expect_err("per token"), Full::Token(2));
        let _b1 = c.acquire(b).expect("other token");
        assert_eq!(
            c.acquire(Principal::ANONYMOUS).expect_err("total"),
            Full::Server(3)
        );
        drop(a1);
        let _a3 = c.acquire(a).expect("a freed slot is reusable");
    }
}
