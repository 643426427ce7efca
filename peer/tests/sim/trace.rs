//! The last events of a run, cheap to record and printed on failure.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use crsync_peer::wire::{MessageKind, PeerMessageKind, TransportMessage};
use crsync_peer::{Cursor, SiteId};

/// Peers have site ids `[i + 1; 16]`: this is `i`.
pub fn peer_index(site: &SiteId) -> usize {
    site.as_bytes()[0] as usize - 1
}

fn site_hex_index(hex: &str) -> String {
    match u8::from_str_radix(hex.get(..2).unwrap_or("zz"), 16) {
        Ok(b) if b > 0 => format!("p{}", b - 1),
        _ => hex.to_owned(),
    }
}

pub fn fmt_cursor(cursor: &Cursor) -> String {
    let parts: Vec<String> = cursor
        .iter()
        .map(|(s, v)| format!("p{}:{}", peer_index(&s), v.0))
        .collect();
    format!("{{{}}}", parts.join(" "))
}

/// What a message said, in short.
#[derive(Clone)]
pub struct Summary {
    kind: MessageKind,
    eose: bool,
    ack: bool,
    hello: bool,
    cursor: Option<String>,
    /// (site, db_version, cid) of each change, up to a few.
    changes: Vec<(String, i64)>,
    n: usize,
    ranges: Option<Vec<(String, i64, i64)>>,
    error: Option<String>,
}

impl Summary {
    pub fn of(m: &TransportMessage) -> Summary {
        let data = m.data.as_ref();
        Summary {
            kind: m.kind,
            eose: data.is_some_and(|d| d.kind == PeerMessageKind::Eose),
            ack: m.ack == Some(true),
            hello: m.crsync.is_some(),
            cursor: m.cursor.as_ref().map(fmt_cursor),
            changes: data
                .map(|d| {
                    d.data
                        .iter()
                        .take(6)
                        .map(|c| (site_hex_index(&c.site_id), c.db_version))
                        .collect()
                })
                .unwrap_or_default(),
            n: data.map_or(0, |d| d.data.len()),
            ranges: data.and_then(|d| {
                d.ranges.as_ref().map(|r| {
                    r.iter()
                        .map(|(s, (a, u))| (site_hex_index(s), *a, *u))
                        .collect()
                })
            }),
            error: m
                .error
                .as_ref()
                .map(|e| format!("{} {e}", m.code.clone().unwrap_or_default())),
        }
    }
}

impl fmt::Debug for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match (self.kind, self.eose, self.ack) {
            (MessageKind::Data, true, _) => "eose",
            (MessageKind::Data, false, _) => "data",
            (MessageKind::Sync, _, true) => "ack",
            (MessageKind::Sync, _, false) => "sync",
            (MessageKind::Connect, ..) => "connect",
            (MessageKind::Ping, ..) => "ping",
            (MessageKind::Error, ..) => "error",
        };
        write!(f, "{kind}")?;
        if self.hello {
            write!(f, "+hello")?;
        }
        if let Some(c) = &self.cursor {
            write!(f, " {c}")?;
        }
        if self.n > 0 {
            write!(f, " {} changes", self.n)?;
            let shown: Vec<String> = self
                .changes
                .iter()
                .map(|(s, v)| format!("{s}@{v}"))
                .collect();
            write!(
                f,
                " [{}{}]",
                shown.join(","),
                if self.n > 6 { ",.." } else { "" }
            )?;
        }
        if let Some(r) = &self.ranges {
            let shown: Vec<String> = r.iter().map(|(s, a, u)| format!("{s}:({a},{u}]")).collect();
            write!(f, " ranges {{{}}}", shown.join(" "))?;
        }
        if let Some(e) = &self.error {
            write!(f, " {e}")?;
        }
        Ok(())
    }
}

/// One recorded event (read by its `Debug`).
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub enum Entry {
    Send {
        conn: u64,
        from: usize,
        to: usize,
        msg: Summary,
    },
    Drop {
        conn: u64,
        from: usize,
        to: usize,
        msg: Summary,
    },
    Dup {
        conn: u64,
        to: usize,
    },
    Deliver {
        conn: u64,
        to: usize,
        msg: Summary,
        reply: Option<u64>,
    },
    Merge {
        peer: usize,
        conn: u64,
        changes: usize,
        result: String,
    },
    Read {
        peer: usize,
        conn: u64,
        from: String,
        after_local: i64,
        skip: Vec<(i64, i64)>,
        batches: usize,
        detail: Vec<String>,
    },
    Note(String),
}

pub struct Trace {
    entries: VecDeque<(Duration, Entry)>,
    cap: usize,
}

impl Trace {
    pub fn new(cap: usize) -> Self {
        Trace {
            entries: VecDeque::new(),
            cap,
        }
    }

    pub fn push(&mut self, at: Duration, entry: Entry) {
        if self.entries.len() == self.cap {
            self.entries.pop_front();
        }
        self.entries.push_back((at, entry));
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (at, e) in &self.entries {
            out.push_str(&format!("  {:>10.3}s {e:?}\n", at.as_secs_f64()));
        }
        out
    }
}
