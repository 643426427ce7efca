//! Wire protocol v1 (JSON), compatible with the TypeScript `@app/sync` package,
//! plus crsync's negotiated extensions.
//!
//! ```text
//! TransportMessage {type: "connect"|"sync"|"data"|"ping"|"error", peerId, cursor?, data?, error?}
//! PeerMessage      {type: "changes"|"eose", data: PeerChange[], schemaVersion?}
//! PeerChange       {table, pk, cid, val, col_version, db_version, site_id, cl, seq}
//! ```
//!
//! Extensions (ignored by v1 peers, which simply never send them):
//! - `connect.crsync` / `sync.crsync = {"version": 1, "encoding": "lossless"}` advertises the
//!   lossless value encoding; a side uses it only after the other advertised it.
//! - `PeerMessage.ranges = {"<site hex>": [after, upto]}`: the version ranges a
//!   batch completes (see [`ChangeBatch`]); without them a batch is taken as it
//!   comes (v1 behaviour).
//! - `PeerMessage.part = {"site": "<hex>", "version": v, "after": s, "upto": s2, "more": bool}`:
//!   the message is one part of origin transaction `v` of that site, too large
//!   for one message: its changes with `seq` in `(after, upto]`; `more` says
//!   further parts follow (see [`TxnPart`](crate::TxnPart)). A v1 peer applies
//!   each part as it comes, as it does with its own paging.
//! - `sync.crsync.staged = [["<site hex>", version, seq], ...]`: transactions
//!   the sender has staged in part, and the highest `seq` of each; the other
//!   side resumes them after that `seq`.
//! - `error.code`: a stable machine-readable code next to the message.
//! - `sync.ack = true`: an acknowledgement between crsync peers (what the
//!   sender now holds); it does not restart the stream the way a `sync` does.
//! - `connect.crsync.session`: over HTTP + SSE, a crsync server's `connect`
//!   (the stream's first message) carries a session secret, which the client
//!   presents on every `POST` in the [`SESSION_HEADER`] header (and on a new
//!   `GET stream`, to replace a stream of its own the server still holds).
//!
//! Values (codec in [`value`]): NULL, UTF-8 text, finite reals and integers
//! within ±(2^53 − 1) are plain JSON in both encodings. With `lossless`, other
//! integers are `{"$int": "<decimal>"}`, blobs `{"$blob": "<base64>"}`,
//! non-finite reals `{"$real": "NaN" | "inf" | "-inf"}` and text that is not
//! valid UTF-8 (SQLite holds whatever bytes it is given) `{"$text": "<base64>"}`.
//! To a v1 peer, values go as a v1 peer writes them itself (`JSON.stringify`
//! of better-sqlite3 values): blobs as Node Buffer JSON
//! `{"type": "Buffer", "data": [<byte>, ...]}`, large integers as JSON numbers,
//! non-finite reals as `null` and text that is not UTF-8 as lossy UTF-8 (with a
//! warning): what v1 can carry.
//!
//! When reading, the [`ValueDialect`] says who wrote the values: a crsync
//! peer's are decoded strictly; a JavaScript peer's never fail to decode
//! (what cannot be decoded exactly is approximated and noted, see
//! [`decode_change_with`]), and what JavaScript numbers lose, INTEGER versus
//! REAL, is restored from the receiving column's affinity
//! ([`normalize_js`](crate::normalize_js)).

pub mod value;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

pub use value::{
    DecodedValue, MAX_SAFE_INTEGER, ValueDialect, decode_value, encode_value, js_number_text,
};

use crate::{Change, ChangeBatch, Cursor, DbVersion, PackedPk, SiteId};

/// Name of the lossless value encoding.
pub const LOSSLESS: &str = "lossless";
/// crsync's protocol extension version (2: `data` messages are numbered,
/// see [`TransportMessage::n`]).
pub const CRSYNC_PROTOCOL_VERSION: u32 = 2;
/// The HTTP header in which a crsync client presents its SSE session secret
/// (`connect.crsync.session`) on `POST sync` / `POST data`.
pub const SESSION_HEADER: &str = "x-crsync-session";

/// How values are written to one remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// Plain v1 JSON.
    #[default]
    V1,
    /// v1 plus tagged objects for what plain JSON loses.
    Lossless,
}

/// The `type` of a transport message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    /// First message of a connection: who the sender is.
    Connect,
    /// The sender's cursor: "send me what I lack" (and, between crsync peers, an ack).
    Sync,
    /// Changes or end-of-stored-events.
    Data,
    /// Keep-alive.
    Ping,
    /// A refusal or failure.
    Error,
}

/// crsync's capabilities, sent in `connect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Extension protocol version.
    pub version: u32,
    /// Value encoding the sender can read.
    pub encoding: String,
    /// `"own-site"`: the sender believes our ranges only about our own site
    /// (see [`Trust`](crate::proto::Trust)), so we send it no others.
    /// Absent: it believes them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub believes: Option<String>,
    /// The session secret a crsync server hands out on an SSE stream's
    /// `connect` (see [`SESSION_HEADER`]); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// On `sync`: transactions the sender has staged in part (site hex,
    /// origin version, highest `seq` staged), to be resumed after that `seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<Vec<(String, i64, i64)>>,
    /// On an acknowledgement (protocol version 2): the highest message number
    /// `n` such that every `data` message of the sender's current stream run
    /// up to `n` arrived (see [`TransportMessage::n`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<u64>,
}

impl Hello {
    /// What this build supports.
    pub fn current() -> Self {
        Hello {
            version: CRSYNC_PROTOCOL_VERSION,
            encoding: LOSSLESS.into(),
            believes: None,
            session: None,
            staged: None,
            received: None,
        }
    }

    /// The transactions this hello says are staged; entries that do not
    /// parse are left out, and at most `limit` are read.
    pub fn staged(&self, limit: usize) -> BTreeMap<(SiteId, DbVersion), i64> {
        self.staged
            .iter()
            .flatten()
            .take(limit)
            .filter_map(|(site, version, seq)| {
                let site = parse_site(site, "staged").ok()?;
                (*version > 0 && *seq >= -1).then_some(((site, DbVersion(*version)), *seq))
            })
            .collect()
    }

    /// The encoding to write to a peer that sent this hello.
    pub fn encoding(hello: Option<&Hello>) -> Encoding {
        match hello {
            Some(h) if h.encoding == LOSSLESS => Encoding::Lossless,
            _ => Encoding::V1,
        }
    }
}

/// A transport message exactly as on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransportMessage {
    /// Message type.
    #[serde(rename = "type")]
    pub kind: MessageKind,
    /// The sender's site id (hex).
    #[serde(rename = "peerId")]
    pub peer_id: String,
    /// The sender's cursor (`sync`, and `connect` from some peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Cursor>,
    /// Changes (`data`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<PeerMessage>,
    /// Error text (`error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Stable error code (`error`, crsync extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// crsync capabilities (`connect` and `sync`, crsync extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crsync: Option<Hello>,
    /// On `sync` (crsync extension): `true` marks an acknowledgement ("I now
    /// hold this"), which does not restart the stream. A `sync` without it asks
    /// for everything the cursor lacks, then `eose`, as in v1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<bool>,
    /// On `data` (crsync extension, protocol version 2): `[first, n]`, this
    /// message's number `n` in the sender's session and the number `first`
    /// of the first message of the stream run it belongs to (a stream that
    /// restarts begins a new run). The receiver acknowledges how far it
    /// received a run without a hole ([`Hello::received`]), so a lost message
    /// is sent again even when no range would show its loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<(u64, u64)>,
    /// On `data` of an initial stream (crsync extension): how many changes
    /// the whole stream holds at most, for the receiver's progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// The `data` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerMessage {
    /// `changes` or `eose`.
    #[serde(rename = "type")]
    pub kind: PeerMessageKind,
    /// The changes.
    #[serde(default)]
    pub data: Vec<PeerChange>,
    /// Sender's `PRAGMA user_version`.
    #[serde(
        rename = "schemaVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub schema_version: Option<i64>,
    /// Version ranges completed by this message (crsync extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<BTreeMap<String, (i64, i64)>>,
    /// The message is one part of a large origin transaction (crsync extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<WirePart>,
    /// The changes, already encoded (then `data` is empty): what a message
    /// built from the Store's live tail carries, written out by
    /// [`TransportMessage::to_json`] as the `data` array. Never on the wire
    /// as a field; read the changes with [`changes`](Self::changes).
    #[serde(skip)]
    pub encoded: Option<EncodedChanges>,
}

/// Changes already encoded as wire JSON: the elements of a `data` array,
/// comma-separated, encoded once for every message that carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChanges {
    json: Arc<str>,
    count: usize,
}

impl EncodedChanges {
    /// How many changes.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The JSON text of the elements (without the brackets).
    pub fn json(&self) -> &str {
        &self.json
    }
}

/// Encodes changes as wire JSON from what it keeps (the Store's live tail
/// encodes each change once, for every session that sends it).
pub trait ChangeEncoder: Send + Sync {
    /// Appends each change's wire JSON to `out`, comma-separated.
    fn write_json(&self, changes: &[Change], encoding: Encoding, out: &mut String);

    /// The changes' wire JSON, comma-separated, as one shared string (an
    /// encoder may hand every message with the same changes the same one).
    fn encode(&self, changes: &[Change], encoding: Encoding) -> Arc<str> {
        let mut json = String::with_capacity(changes.len() * 160);
        self.write_json(changes, encoding, &mut json);
        json.into()
    }
}

/// A batch's [`ChangeEncoder`], if it came from one. It never affects a
/// batch's equality or (de)serialization.
#[derive(Clone, Default)]
pub struct WireCache(Option<Arc<dyn ChangeEncoder>>);

impl WireCache {
    /// Encodes with `encoder`.
    pub fn new(encoder: Arc<dyn ChangeEncoder>) -> Self {
        WireCache(Some(encoder))
    }

    /// Whether there is an encoder.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Debug for WireCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "WireCache(shared)"
        } else {
            "WireCache(none)"
        })
    }
}

impl PartialEq for WireCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl PeerMessage {
    /// The changes, decoding [`encoded`](Self::encoded) ones.
    pub fn changes(&self) -> Result<Cow<'_, [PeerChange]>, DecodeError> {
        match &self.encoded {
            Some(e) if self.data.is_empty() => {
                let text = format!("[{}]", e.json);
                let changes: Vec<PeerChange> = serde_json::from_str(&text)
                    .map_err(|err| DecodeError::Malformed(err.to_string()))?;
                Ok(Cow::Owned(changes))
            }
            _ => Ok(Cow::Borrowed(&self.data)),
        }
    }

    /// How many changes it carries.
    pub fn change_count(&self) -> usize {
        match &self.encoded {
            Some(e) if self.data.is_empty() => e.count,
            _ => self.data.len(),
        }
    }
}

/// [`TxnPart`](crate::TxnPart) as on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WirePart {
    /// Origin site, lowercase hex.
    pub site: String,
    /// Origin version.
    pub version: i64,
    /// The receiver holds the changes up to this `seq` (`-1`: none).
    pub after: i64,
    /// The highest `seq` in this part.
    pub upto: i64,
    /// Further parts follow.
    pub more: bool,
}

/// The `type` of a [`PeerMessage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerMessageKind {
    /// A batch of changes.
    Changes,
    /// End of stored events: the initial sync is complete.
    Eose,
}

/// One change as on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerChange {
    /// Table.
    pub table: String,
    /// Packed primary key, lowercase hex.
    pub pk: String,
    /// Column id.
    pub cid: String,
    /// Value (see the module docs for the encoding).
    pub val: Json,
    /// Column version.
    pub col_version: i64,
    /// Origin db_version.
    pub db_version: i64,
    /// Origin site id, lowercase hex.
    pub site_id: String,
    /// Causal length.
    pub cl: i64,
    /// Sequence within the origin transaction.
    pub seq: i64,
}

/// A message could not be decoded; nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not JSON, or not the expected shape.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A hex field that is not hex.
    #[error("field {field} is not valid hex")]
    BadHex {
        /// Which field.
        field: &'static str,
    },
    /// A site id of the wrong length.
    #[error("invalid site id in {field}: {reason}")]
    BadSiteId {
        /// Which field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A value that no encoding produces.
    #[error("invalid value in change #{index}: {reason}")]
    BadValue {
        /// Position in the message.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A version no database has: a negative cursor entry or range bound, or
    /// a range whose upper bound is below its lower one.
    #[error("invalid version in {field} for site {site}: {reason}")]
    BadVersion {
        /// Which field (`cursor` or `ranges`).
        field: &'static str,
        /// The site the entry is for, as sent.
        site: String,
        /// Why.
        reason: String,
    },
    /// A message kind without the field it needs.
    #[error("{kind:?} message lacks {field}")]
    Missing {
        /// Message kind.
        kind: MessageKind,
        /// Missing field.
        field: &'static str,
    },
}

impl TransportMessage {
    /// Parses a message from JSON text, then [`validate`](Self::validate)s it.
    pub fn from_json(text: &str) -> Result<Self, DecodeError> {
        let message: Self =
            serde_json::from_str(text).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        message.validate()?;
        Ok(message)
    }

    /// Checks what the JSON shape alone does not: cursor versions are never
    /// negative, and each range `[after, upto]` has `0 <= after <= upto`.
    ///
    /// ```
    /// use crsync_peer::wire::{DecodeError, TransportMessage};
    /// let site = "0a".repeat(16);
    /// let sync = format!(r#"{{"type":"sync","peerId":"{site}","cursor":{{"peers":{{"{site}":-1}}}}}}"#);
    /// assert!(matches!(TransportMessage::from_json(&sync), Err(DecodeError::BadVersion { .. })));
    /// ```
    pub fn validate(&self) -> Result<(), DecodeError> {
        let bad = |field, site: &dyn std::fmt::Display, reason: String| DecodeError::BadVersion {
            field,
            site: site.to_string(),
            reason,
        };
        for (site, version) in self.cursor.iter().flat_map(Cursor::iter) {
            if version.0 < 0 {
                return Err(bad("cursor", &site, format!("{version} is negative")));
            }
        }
        let ranges = self.data.as_ref().and_then(|d| d.ranges.as_ref());
        for (site, &(after, upto)) in ranges.into_iter().flatten() {
            if after < 0 || upto < 0 {
                return Err(bad(
                    "ranges",
                    site,
                    format!("[{after}, {upto}] is negative"),
                ));
            }
            if upto < after {
                return Err(bad(
                    "ranges",
                    site,
                    format!("[{after}, {upto}] is reversed"),
                ));
            }
        }
        if let Some(part) = self.data.as_ref().and_then(|d| d.part.as_ref()) {
            if part.version <= 0 || part.after < -1 || part.upto < part.after {
                return Err(bad(
                    "part",
                    &part.site,
                    format!(
                        "version {} with seq span ({}, {}] is invalid",
                        part.version, part.after, part.upto
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Serializes to JSON text.
    pub fn to_json(&self) -> String {
        self.to_text().into_string()
    }

    /// Serializes to JSON text in pieces: the changes of a message built
    /// from the live tail stay the string every session sending them shares,
    /// for a transport that writes the pieces out itself (one copy, into its
    /// frame) instead of joining them first.
    ///
    /// ```
    /// use crsync_peer::{SiteId, wire::TransportMessage};
    /// let ping = TransportMessage::ping(SiteId::from_bytes([7; 16]));
    /// let text = ping.to_text();
    /// assert_eq!(text.len(), ping.to_json().len());
    /// assert_eq!(text.into_string(), ping.to_json());
    /// ```
    pub fn to_text(&self) -> MessageText {
        // Serializing these types cannot fail: all map keys are strings.
        let text = serde_json::to_string(self).unwrap_or_default();
        match self.data.as_ref().and_then(|d| d.encoded.as_ref()) {
            Some(encoded) if self.data.as_ref().is_some_and(|d| d.data.is_empty()) => {
                splice_changes(text, encoded)
            }
            _ => MessageText {
                head: text,
                shared: None,
                tail: String::new(),
            },
        }
    }

    /// Decodes [`PeerMessage::encoded`] changes into `data`, for code that
    /// reads the message's fields directly (a transport that hands messages
    /// over in memory does this before delivering them).
    pub fn materialize(&mut self) -> Result<(), DecodeError> {
        if let Some(data) = &mut self.data {
            if data.encoded.is_some() {
                let changes = data.changes()?.into_owned();
                data.data = changes;
                data.encoded = None;
            }
        }
        Ok(())
    }

    fn bare(kind: MessageKind, peer: SiteId) -> Self {
        TransportMessage {
            kind,
            peer_id: peer.to_hex(),
            cursor: None,
            data: None,
            error: None,
            code: None,
            crsync: None,
            ack: None,
            n: None,
            total: None,
        }
    }

    /// `connect` with crsync's capabilities.
    pub fn connect(peer: SiteId) -> Self {
        TransportMessage {
            crsync: Some(Hello::current()),
            ..Self::bare(MessageKind::Connect, peer)
        }
    }

    /// `sync` with a cursor: "send me everything this cursor lacks, then `eose`".
    /// Carries crsync's capabilities too, in case `connect` was lost.
    pub fn sync(peer: SiteId, cursor: Cursor) -> Self {
        TransportMessage {
            cursor: Some(cursor),
            crsync: Some(Hello::current()),
            ..Self::bare(MessageKind::Sync, peer)
        }
    }

    /// An acknowledgement: a `sync` marked `ack`, telling a crsync peer what we hold.
    pub fn ack(peer: SiteId, cursor: Cursor) -> Self {
        TransportMessage {
            ack: Some(true),
            ..Self::sync(peer, cursor)
        }
    }

    /// `ping`.
    pub fn ping(peer: SiteId) -> Self {
        Self::bare(MessageKind::Ping, peer)
    }

    /// `error` with a stable code.
    pub fn error(peer: SiteId, code: &crate::proto::ErrorCode, message: impl Into<String>) -> Self {
        TransportMessage {
            error: Some(message.into()),
            code: Some(code.as_str().into()),
            ..Self::bare(MessageKind::Error, peer)
        }
    }

    /// `data` carrying a batch (`eose` marks the end of the initial sync).
    pub fn data(
        peer: SiteId,
        batch: &ChangeBatch,
        eose: bool,
        schema_version: i64,
        encoding: Encoding,
    ) -> Self {
        let message = PeerMessage {
            kind: if eose {
                PeerMessageKind::Eose
            } else {
                PeerMessageKind::Changes
            },
            data: match batch.wire.0 {
                Some(_) => Vec::new(),
                None => batch
                    .changes
                    .iter()
                    .map(|c| encode_change(c, encoding))
                    .collect(),
            },
            schema_version: Some(schema_version),
            ranges: Some(
                batch
                    .ranges
                    .iter()
                    .map(|(s, r)| (s.to_hex(), (r.after.0, r.upto.0)))
                    .collect(),
            ),
            part: batch.part.map(|p| WirePart {
                site: p.site.to_hex(),
                version: p.version.0,
                after: p.after_seq,
                upto: p.upto_seq,
                more: p.more,
            }),
            encoded: batch.wire.0.as_ref().map(|encoder| EncodedChanges {
                json: encoder.encode(&batch.changes, encoding),
                count: batch.changes.len(),
            }),
        };
        TransportMessage {
            data: Some(message),
            ..Self::bare(MessageKind::Data, peer)
        }
    }

    /// The sender's site id.
    pub fn sender(&self) -> Result<SiteId, DecodeError> {
        parse_site(&self.peer_id, "peerId")
    }
}

fn parse_site(hex_text: &str, field: &'static str) -> Result<SiteId, DecodeError> {
    let bytes = hex::decode(hex_text).map_err(|_| DecodeError::BadHex { field })?;
    SiteId::from_slice(&bytes).map_err(|e| DecodeError::BadSiteId {
        field,
        reason: e.reason,
    })
}

/// Places `encoded` in the empty `data` array of a serialized `data`
/// message. The array is the first `"data":[]` after the `data` object's
/// `type` (the message's own fields before it hold no such text: hex ids,
/// a cursor of hex keys and numbers).
fn splice_changes(mut text: String, encoded: &EncodedChanges) -> MessageText {
    for marker in [
        "{\"type\":\"changes\",\"data\":[",
        "{\"type\":\"eose\",\"data\":[",
    ] {
        if let Some(at) = text.find(marker) {
            let tail = text.split_off(at + marker.len());
            return MessageText {
                head: text,
                shared: Some(Arc::clone(&encoded.json)),
                tail,
            };
        }
    }
    MessageText {
        head: text,
        shared: None,
        tail: String::new(),
    }
}

/// A message's JSON text ([`TransportMessage::to_text`]): what comes before
/// its changes, the changes as every message carrying them shares them, and
/// what follows. Like all of serde_json's compact output, it holds no line
/// break (one in a string is escaped), so it is one SSE `data:` line as is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageText {
    head: String,
    shared: Option<Arc<str>>,
    tail: String,
}

impl MessageText {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.head.len() + self.shared.as_ref().map_or(0, |s| s.len()) + self.tail.len()
    }

    /// Whether it is empty (never, for a serialized message).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its pieces, in order.
    pub fn pieces(&self) -> impl Iterator<Item = &str> {
        [
            self.head.as_str(),
            self.shared.as_deref().unwrap_or(""),
            self.tail.as_str(),
        ]
        .into_iter()
        .filter(|p| !p.is_empty())
    }

    /// Its pieces: the text before the shared changes (all of it when there
    /// are none), the shared changes, and the text after them.
    pub fn into_parts(self) -> (String, Option<Arc<str>>, String) {
        (self.head, self.shared, self.tail)
    }

    /// The whole text, joined into a string of its own.
    pub fn joined(&self) -> String {
        let mut out = String::with_capacity(self.len());
        for piece in self.pieces() {
            out.push_str(piece);
        }
        out
    }

    /// The whole text, joined (without a copy when it is one piece).
    pub fn into_string(self) -> String {
        if self.shared.is_none() && self.tail.is_empty() {
            return self.head;
        }
        self.joined()
    }
}

/// The wire JSON of one change (what [`TransportMessage::to_json`] writes
/// for it in a `data` array).
pub fn change_json(c: &Change, encoding: Encoding) -> String {
    serde_json::to_string(&encode_change(c, encoding)).unwrap_or_default()
}

/// Encodes one change.
pub fn encode_change(c: &Change, encoding: Encoding) -> PeerChange {
    PeerChange {
        table: c.table.clone(),
        pk: hex::encode(&c.pk.0),
        cid: c.cid.clone(),
        val: encode_value(&c.val, encoding),
        col_version: c.col_version,
        db_version: c.db_version.0,
        site_id: c.site_id.to_hex(),
        cl: c.cl,
        seq: c.seq,
    }
}

/// Decodes one change from a crsync peer (`index` is its position, for errors).
pub fn decode_change(c: &PeerChange, index: usize) -> Result<Change, DecodeError> {
    // crsync values are exact: there is never a note
    decode_change_with(c, index, ValueDialect::Crsync).map(|(change, _)| change)
}

/// Decodes one change whose value `dialect` wrote, with a note when the value
/// could only be approximated (see [`decode_value`]).
pub fn decode_change_with(
    c: &PeerChange,
    index: usize,
    dialect: ValueDialect,
) -> Result<(Change, Option<String>), DecodeError> {
    let val =
        decode_value(&c.val, dialect).map_err(|reason| DecodeError::BadValue { index, reason })?;
    let change = Change {
        table: c.table.clone(),
        pk: PackedPk(hex::decode(&c.pk).map_err(|_| DecodeError::BadHex { field: "pk" })?),
        cid: c.cid.clone(),
        val: val.value,
        col_version: c.col_version,
        db_version: DbVersion(c.db_version),
        site_id: parse_site(&c.site_id, "site_id")?,
        cl: c.cl,
        seq: c.seq,
    };
    Ok((change, val.approximated))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoding_arbitrary_json_never_panics(s in ".{0,200}") {
            let _ = TransportMessage::from_json(&s);
        }
    }

    /// Encodes the changes afresh each time, as the live tail's encoder
    /// would the first time.
    struct Fresh;

    impl ChangeEncoder for Fresh {
        fn write_json(&self, changes: &[Change], encoding: Encoding, out: &mut String) {
            let json: Vec<String> = changes.iter().map(|c| change_json(c, encoding)).collect();
            out.push_str(&json.join(","));
        }
    }

    #[test]
    fn a_message_in_pieces_is_the_json_of_the_message_and_one_line() {
        let peer = SiteId::from_bytes([7; 16]);
        let site = SiteId::from_bytes([9; 16]);
        let change = |v: i64, text: &str| Change {
            table: "t".into(),
            pk: crate::PackedPk::pack(&[crate::SqlValue::Integer(v)]),
            cid: "x".into(),
            val: crate::SqlValue::Text(text.as_bytes().to_vec()),
            col_version: 1,
            db_version: DbVersion(v),
            site_id: site,
            cl: 1,
            seq: 0,
        };
        let mut batch = ChangeBatch {
            changes: vec![change(1, "two\nlines"), change(2, "\r\n\u{2028}")],
            ..ChangeBatch::default()
        };
        let plain = TransportMessage::data(peer, &batch, true, 3, Encoding::V1);
        batch.wire = WireCache::new(Arc::new(Fresh));
        let shared = TransportMessage::data(peer, &batch, true, 3, Encoding::V1);
        let (head, changes, tail) = shared.to_text().into_parts();
        let changes = changes.expect("the encoded changes stay one shared piece");
        assert!(
            head.ends_with("\"data\":[") && tail.starts_with(']'),
            "{head} / {tail}"
        );
        assert_eq!(shared.to_text().len(), plain.to_json().len());
        assert_eq!(format!("{head}{changes}{tail}"), plain.to_json());
        assert_eq!(shared.to_json(), plain.to_json());
        let error = TransportMessage::error(peer, &crate::proto::ErrorCode::Malformed, "a\nb\r");
        for text in [shared.to_text(), error.to_text()] {
            assert!(
                !text.pieces().any(|p| p.contains(['\n', '\r'])),
                "an SSE data line"
            );
        }
    }

    #[test]
    fn refuses_negative_versions_and_reversed_ranges() {
        let site = "0a".repeat(16);
        let sync = |version: i64| {
            format!(
                r#"{{"type":"sync","peerId":"{site}","ack":true,"cursor":{{"peers":{{"{site}":{version}}}}}}}"#
            )
        };
        assert!(TransportMessage::from_json(&sync(0)).is_ok());
        assert!(TransportMessage::from_json(&sync(7)).is_ok());
        for version in [-1, i64::MIN] {
            let e = TransportMessage::from_json(&sync(version)).expect_err("negative cursor");
            assert!(
                matches!(
                    &e,
                    DecodeError::BadVersion {
                        field: "cursor",
                        ..
                    }
                ),
                "{e}"
            );
        }
        let data = |after: i64, upto: i64| {
            format!(
                r#"{{"type":"data","peerId":"{site}","data":{{"type":"eose","data":[],"ranges":{{"{site}":[{after},{upto}]}}}}}}"#
            )
        };
        assert!(TransportMessage::from_json(&data(0, 0)).is_ok());
        assert!(TransportMessage::from_json(&data(3, 9)).is_ok());
        for (after, upto) in [(-1, 5), (-5, -1), (0, -1), (9, 3)] {
            let e = TransportMessage::from_json(&data(after, upto)).expect_err("bad range");
            assert!(
                matches!(
                    &e,
                    DecodeError::BadVersion {
                        field: "ranges",
                        ..
                    }
                ),
                "[{after}, {upto}]: {e}"
            );
        }
    }

    #[test]
    fn rejects_bad_site_ids_and_hex() {
        let bad = |site: &str, pk: &str| PeerChange {
            table: "t".into(),
            pk: pk.into(),
            cid: "x".into(),
            val: Json::Null,
            col_version: 1,
            db_version: 1,
            site_id: site.into(),
            cl: 1,
            seq: 0,
        };
        assert!(matches!(
            decode_change(&bad("abcd", "01"), 0),
            Err(DecodeError::BadSiteId { .. })
        ));
        assert!(matches!(
            decode_change(&bad("zz", "01"), 0),
            Err(DecodeError::BadHex { field: "site_id" })
        ));
        assert!(matches!(
            decode_change(&bad(&"00".repeat(16), "0g"), 0),
            Err(DecodeError::BadHex { field: "pk" })
        ));
    }
}
