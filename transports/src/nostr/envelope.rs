//! Our messages in Nostr events: a rumor (never published) carrying one
//! fragment of a message, sealed by the real sender and gift-wrapped by a
//! one-time key for the recipient (NIP-59), encrypted twice with NIP-44 v2.
//!
//! The relay sees a kind 1059 event from a random key, with a `p` tag for the
//! recipient's pairing key and a NIP-40 `expiration` tag, at a time
//! randomised up to two days into the past: neither the sender nor the
//! contents. Inside the rumor (only the recipient reads it):
//! - `["crsync", "1"]`: ours, format 1;
//! - `["epoch", <id hex>, <started ms>]`: the sender's session;
//! - `["seq", <n>]`: the message's number in that session (from 0);
//! - `["frag", <i>, <k>]`: fragment `i` of `k` of the message's JSON;
//! - `["to", <epoch id hex>]`: the recipient's session the sender answers, if any.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use nostr::{
    Event, EventBuilder, EventId, Keys, Kind, PublicKey, Tag, TagKind, Timestamp, UnsignedEvent,
};

/// Kind of the rumors that carry sync messages.
pub(crate) const SYNC_KIND: u16 = 7310;
/// Kind of the rumors that carry pairing requests and answers.
pub(crate) const PAIR_KIND: u16 = 7311;
/// Largest event we publish, as JSON: relays commonly take 64 KiB.
pub(crate) const MAX_EVENT_BYTES: usize = 60 * 1024;
/// First try at the plaintext of one fragment (gift wrap encrypts twice,
/// each time with padding and base64: about 2.4 times larger in the end).
const FIRST_FRAGMENT_BYTES: usize = 24 * 1024;
/// Fragments of one message at most (bounds what a receiver reassembles).
pub(crate) const MAX_FRAGMENTS: u32 = 4096;

/// One session of a device: a random id and when it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Epoch {
    /// When it started (Unix ms): later sessions are newer.
    pub(crate) started: u64,
    /// Random id.
    pub(crate) id: u64,
}

impl Epoch {
    pub(crate) fn new() -> Self {
        Epoch {
            started: super::unix_now_ms(),
            id: rand::random(),
        }
    }

    pub(crate) fn id_hex(&self) -> String {
        format!("{:016x}", self.id)
    }
}

/// What a rumor says about its fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) epoch: Epoch,
    pub(crate) seq: u64,
    pub(crate) index: u32,
    pub(crate) count: u32,
    pub(crate) to: Option<u64>,
}

/// A fragment taken out of a gift wrap from the expected sender.
#[derive(Debug, Clone)]
pub(crate) struct Opened {
    /// The gift wrap's id.
    pub(crate) id: EventId,
    pub(crate) header: Header,
    /// The rumor's own time (real, unlike the wrapper's).
    pub(crate) created_at: u64,
    pub(crate) content: String,
}

/// Why an event was not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("not a gift wrap")]
    NotGiftWrap,
    #[error("cannot unwrap: {0}")]
    Unwrap(String),
    #[error("sealed by another key than the paired device's")]
    ForeignSender,
    #[error("not a crsync rumor: {0}")]
    Foreign(&'static str),
}

fn tag(name: &str, values: &[String]) -> Tag {
    Tag::custom(TagKind::custom(name.to_owned()), values.iter().cloned())
}

fn rumor(keys: &Keys, kind: u16, content: String, tags: Vec<Tag>) -> UnsignedEvent {
    EventBuilder::new(Kind::Custom(kind), content)
        .tags(tags)
        .build(keys.public_key())
}

/// Gift-wraps a rumor for `to`, expiring after `expiry` (NIP-40).
pub(crate) async fn wrap(
    keys: &Keys,
    to: &PublicKey,
    rumor: UnsignedEvent,
    expiry: Duration,
) -> Result<Event, String> {
    let expires = Timestamp::from(super::unix_now() + expiry.as_secs());
    EventBuilder::gift_wrap(keys, to, rumor, [Tag::expiration(expires)])
        .await
        .map_err(|e| e.to_string())
}

/// Splits `text` into pieces of at most `max` bytes, at char boundaries.
pub(crate) fn split(text: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(max.max(4));
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        pieces.push(piece);
        rest = tail;
    }
    if pieces.is_empty() {
        pieces.push("");
    }
    pieces
}

/// The events that carry one message (`json`) as number `seq` of session
/// `epoch`, each under [`MAX_EVENT_BYTES`]: fragments are made smaller until
/// every event fits.
pub(crate) async fn wrap_message(
    keys: &Keys,
    to: &PublicKey,
    epoch: Epoch,
    seq: u64,
    to_epoch: Option<u64>,
    json: &str,
    expiry: Duration,
) -> Result<Vec<Event>, String> {
    let mut budget = FIRST_FRAGMENT_BYTES;
    'size: loop {
        let pieces = split(json, budget);
        let count = u32::try_from(pieces.len()).unwrap_or(u32::MAX);
        if count > MAX_FRAGMENTS {
            return Err(format!(
                "message of {} bytes needs more than {MAX_FRAGMENTS} events",
                json.len()
            ));
        }
        let mut events = Vec::with_capacity(pieces.len());
        for (index, piece) in pieces.into_iter().enumerate() {
            let mut tags = vec![
                tag("crsync", &["1".into()]),
                tag("epoch", &[epoch.id_hex(), epoch.started.to_string()]),
                tag("seq", &[seq.to_string()]),
                tag("frag", &[index.to_string(), count.to_string()]),
            ];
            if let Some(to) = to_epoch {
                tags.push(tag("to", &[format!("{to:016x}")]));
            }
            let event = wrap(keys, to, rumor(keys, SYNC_KIND, piece.into(), tags), expiry).await?;
            if event.as_json().len() > MAX_EVENT_BYTES {
                if budget <= 1024 {
                    return Err("cannot fit a fragment into one event".into());
                }
                budget /= 2;
                continue 'size;
            }
            events.push(event);
        }
        return Ok(events);
    }
}

use nostr::JsonUtil;

/// A pairing message (`content` is its JSON) for `to`.
pub(crate) async fn wrap_pairing(
    keys: &Keys,
    to: &PublicKey,
    content: String,
    expiry: Duration,
) -> Result<Event, String> {
    let tags = vec![tag("crsync", &["1".into()])];
    wrap(keys, to, rumor(keys, PAIR_KIND, content, tags), expiry).await
}

/// Unwraps a gift wrap: the seal's signer and the rumor, checked (the
/// wrapper's signature and id, the seal's, the rumor's author).
pub(crate) async fn unwrap(
    keys: &Keys,
    event: &Event,
) -> Result<(PublicKey, UnsignedEvent), OpenError> {
    if event.kind != Kind::GiftWrap {
        return Err(OpenError::NotGiftWrap);
    }
    event
        .verify()
        .map_err(|e| OpenError::Unwrap(e.to_string()))?;
    let gift = nostr::nips::nip59::UnwrappedGift::from_gift_wrap(keys, event)
        .await
        .map_err(|e| OpenError::Unwrap(e.to_string()))?;
    Ok((gift.sender, gift.rumor))
}

fn values(rumor: &UnsignedEvent, name: &str) -> Option<Vec<String>> {
    rumor
        .tags
        .iter()
        .find(|t| t.kind() == TagKind::custom(name.to_owned()))
        .map(|t| t.as_slice()[1..].to_vec())
}

fn number<T: std::str::FromStr>(v: Option<&String>) -> Option<T> {
    v.and_then(|s| s.parse().ok())
}

/// Opens a sync fragment from `sender` (our paired device).
pub(crate) async fn open(
    keys: &Keys,
    sender: &PublicKey,
    event: &Event,
) -> Result<Opened, OpenError> {
    let (from, rumor) = unwrap(keys, event).await?;
    if &from != sender {
        return Err(OpenError::ForeignSender);
    }
    if rumor.kind != Kind::Custom(SYNC_KIND) {
        return Err(OpenError::Foreign("another kind"));
    }
    if values(&rumor, "crsync")
        .and_then(|v| v.first().cloned())
        .as_deref()
        != Some("1")
    {
        return Err(OpenError::Foreign("no crsync tag"));
    }
    let bad = OpenError::Foreign;
    let epoch = values(&rumor, "epoch").ok_or(bad("no epoch"))?;
    let id = epoch
        .first()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or(bad("bad epoch id"))?;
    let started = number(epoch.get(1)).ok_or(bad("bad epoch start"))?;
    let seq = number(values(&rumor, "seq").ok_or(bad("no seq"))?.first()).ok_or(bad("bad seq"))?;
    let frag = values(&rumor, "frag").ok_or(bad("no frag"))?;
    let index: u32 = number(frag.first()).ok_or(bad("bad frag"))?;
    let count: u32 = number(frag.get(1)).ok_or(bad("bad frag"))?;
    if count == 0 || count > MAX_FRAGMENTS || index >= count {
        return Err(bad("fragment out of range"));
    }
    let to =
        values(&rumor, "to").and_then(|v| v.first().and_then(|s| u64::from_str_radix(s, 16).ok()));
    Ok(Opened {
        id: event.id,
        header: Header {
            epoch: Epoch { started, id },
            seq,
            index,
            count,
            to,
        },
        created_at: rumor.created_at.as_secs(),
        content: rumor.content,
    })
}

/// Messages in fragments, put back together in bounded memory: at most
/// `max_messages` incomplete messages and `max_bytes` of their fragments;
/// past that, the oldest incomplete one is dropped (the sync protocol asks
/// again for what never arrives).
#[derive(Debug)]
pub(crate) struct Reassembly {
    partial: BTreeMap<(Epoch, u64), Partial>,
    order: VecDeque<(Epoch, u64)>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

#[derive(Debug)]
struct Partial {
    count: u32,
    pieces: BTreeMap<u32, String>,
    events: Vec<EventId>,
    created_at: u64,
    to: Option<u64>,
}

/// A whole message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Whole {
    pub(crate) epoch: Epoch,
    pub(crate) seq: u64,
    pub(crate) to: Option<u64>,
    pub(crate) created_at: u64,
    pub(crate) json: String,
    /// The gift wraps it came in (one per fragment).
    pub(crate) events: Vec<EventId>,
}

impl Reassembly {
    pub(crate) fn new(max_messages: usize, max_bytes: usize) -> Self {
        Reassembly {
            partial: BTreeMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_messages: max_messages.max(1),
            max_bytes,
        }
    }

    /// Bytes held in incomplete messages.
    #[cfg(test)]
    pub(crate) fn held_bytes(&self) -> usize {
        self.bytes
    }

    /// Takes a fragment; returns the message once it is complete.
    pub(crate) fn add(&mut self, opened: Opened) -> Option<Whole> {
        let h = opened.header;
        if h.count == 1 {
            return Some(Whole {
                epoch: h.epoch,
                seq: h.seq,
                to: h.to,
                created_at: opened.created_at,
                json: opened.content,
                events: vec![opened.id],
            });
        }
        let key = (h.epoch, h.seq);
        if !self.partial.contains_key(&key) {
            while self.partial.len() >= self.max_messages {
                self.evict_oldest();
            }
            self.order.push_back(key);
            self.partial.insert(
                key,
                Partial {
                    count: h.count,
                    pieces: BTreeMap::new(),
                    events: Vec::new(),
                    created_at: opened.created_at,
                    to: h.to,
                },
            );
        }
        let partial = self.partial.get_mut(&key)?;
        if partial.count != h.count || partial.pieces.contains_key(&h.index) {
            return None;
        }
        self.bytes += opened.content.len();
        partial.pieces.insert(h.index, opened.content);
        partial.events.push(opened.id);
        if partial.pieces.len() as u32 == partial.count {
            let partial = self.partial.remove(&key)?;
            self.order.retain(|k| *k != key);
            let json: String = partial.pieces.into_values().collect();
            self.bytes -= json.len();
            return Some(Whole {
                epoch: h.epoch,
                seq: h.seq,
                to: partial.to,
                created_at: partial.created_at,
                json,
                events: partial.events,
            });
        }
        while self.bytes > self.max_bytes && self.partial.len() > 1 {
            self.evict_oldest();
        }
        None
    }

    fn evict_oldest(&mut self) {
        if let Some(key) = self.order.pop_front() {
            if let Some(p) = self.partial.remove(&key) {
                self.bytes -= p.pieces.values().map(String::len).sum::<usize>();
                tracing::debug!(
                    seq = key.1,
                    "dropping an incomplete message: reassembly is full"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_chars_whole_and_order() {
        let text = "añb€c".repeat(100);
        let pieces = split(&text, 7);
        assert!(pieces.iter().all(|p| p.len() <= 7 && !p.is_empty()));
        assert_eq!(pieces.concat(), text);
    }

    #[tokio::test]
    async fn a_large_message_travels_in_fragments_under_the_event_limit() {
        let (a, b) = (Keys::generate(), Keys::generate());
        let json = "x\"y".repeat(40_000);
        let epoch = Epoch::new();
        let events = wrap_message(
            &a,
            &b.public_key(),
            epoch,
            3,
            Some(9),
            &json,
            Duration::from_secs(60),
        )
        .await
        .expect("wraps");
        assert!(events.len() > 1);
        assert!(events.iter().all(|e| e.as_json().len() <= MAX_EVENT_BYTES));
        let mut re = Reassembly::new(4, 1 << 20);
        let mut whole = None;
        for e in events.iter().rev() {
            let opened = open(&b, &a.public_key(), e).await.expect("opens");
            assert_eq!(opened.header.to, Some(9));
            whole = re.add(opened).or(whole);
        }
        let whole = whole.expect("complete");
        assert_eq!(whole.json, json);
        assert_eq!((whole.epoch, whole.seq), (epoch, 3));
        let mut ids: Vec<_> = events.iter().map(|e| e.id).collect();
        let mut carried = whole.events.clone();
        ids.sort();
        carried.sort();
        assert_eq!(carried, ids, "the whole names every gift wrap it came in");
        assert_eq!(re.held_bytes(), 0);
        // Not from the paired key: refused; not for us: cannot be unwrapped.
        let c = Keys::generate();
        assert!(matches!(
            open(&b, &c.public_key(), &events[0]).await,
            Err(OpenError::ForeignSender)
        ));
        assert!(open(&c, &a.public_key(), &events[0]).await.is_err());
    }

    #[tokio::test]
    async fn reassembly_memory_is_bounded() {
        let (a, b) = (Keys::generate(), Keys::generate());
        let mut re = Reassembly::new(2, 100_000);
        for seq in 0..10 {
            let events = wrap_message(
                &a,
                &b.public_key(),
                Epoch::new(),
                seq,
                None,
                &"z".repeat(60_000),
                Duration::from_secs(60),
            )
            .await
            .expect("wraps");
            // Only the first fragment of each: none completes.
            let opened = open(&b, &a.public_key(), &events[0]).await.expect("opens");
            assert!(re.add(opened).is_none());
            assert!(re.partial.len() <= 2);
        }
    }

    #[tokio::test]
    async fn a_modified_event_is_refused() {
        let (a, b) = (Keys::generate(), Keys::generate());
        let events = wrap_message(
            &a,
            &b.public_key(),
            Epoch::new(),
            0,
            None,
            "{}",
            Duration::from_secs(60),
        )
        .await
        .expect("wraps");
        let mut json: serde_json::Value = serde_json::from_str(&events[0].as_json()).expect("json");
        json["created_at"] = serde_json::json!(1);
        let tampered = Event::from_json(json.to_string()).expect("parses");
        assert!(open(&b, &a.public_key(), &tampered).await.is_err());
    }
}
