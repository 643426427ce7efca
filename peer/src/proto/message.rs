//! [`Message`]: a [`TransportMessage`] parsed once, at the edge, into what it means.

use crate::proto::ErrorCode;
use crate::wire::{
    DecodeError, Hello, MessageKind, PeerMessage, PeerMessageKind, TransportMessage, ValueDialect,
    decode_change_with,
};
use crate::{ChangeBatch, Cursor, DbVersion, SiteId, TxnPart, VersionRange};

/// What a remote said.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Message {
    /// Who the remote is; crsync peers add their capabilities.
    Connect {
        /// crsync's capabilities (absent from v1 peers).
        hello: Option<Hello>,
    },
    /// "Send me everything this cursor lacks, then `eose`" (a v1 `sync`).
    SyncRequest {
        /// What the remote holds.
        cursor: Cursor,
        /// crsync's capabilities, repeated in case `connect` was lost.
        hello: Option<Hello>,
    },
    /// A crsync acknowledgement: what the remote now holds (a `sync` with `ack`).
    Ack {
        /// What the remote holds.
        cursor: Cursor,
        /// crsync's capabilities.
        hello: Option<Hello>,
    },
    /// Changes, or the end of the remote's initial stream.
    Data(ParsedData),
    /// Keep-alive.
    Ping,
    /// A refusal or failure.
    Error {
        /// The stable code (inferred from the text for v1 peers, which send none).
        code: ErrorCode,
        /// Detail.
        message: String,
    },
}

/// A decoded `data` message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedData {
    /// The changes, ranges and schema version.
    pub batch: ChangeBatch,
    /// `eose`: the remote's initial stream is complete.
    pub eose: bool,
    /// The message carried ranges (crsync's extension); a v1 peer's never do.
    pub ranged: bool,
    /// Values of a JavaScript sender that could only be approximated, and
    /// changes that could not be decoded and were left out, one line each
    /// (the rest of the message is still applied).
    pub notes: Vec<String>,
    /// A crsync sender's message number: `(first of its stream run, this one)`.
    pub number: Option<(u64, u64)>,
    /// A crsync sender's count of the changes its initial stream holds at most.
    pub total: Option<u64>,
}

impl ParsedData {
    /// Decodes a `data` payload. `javascript`: the sender is a v1 peer (see
    /// [`Message::parse`]); a payload with `ranges` is always crsync's.
    ///
    /// ```
    /// use crsync_peer::proto::ParsedData;
    /// use crsync_peer::wire::PeerMessage;
    /// let v1: PeerMessage = serde_json::from_str(r#"{"type":"changes","data":[]}"#).unwrap();
    /// let data = ParsedData::decode(&v1, true).unwrap();
    /// assert!(!data.ranged && data.batch.ranges.is_empty()); // v1 batches are unranged
    /// ```
    pub fn decode(data: &PeerMessage, javascript: bool) -> Result<Self, DecodeError> {
        let javascript = javascript && data.ranges.is_none();
        let mut parsed = ParsedData {
            eose: data.kind == PeerMessageKind::Eose,
            ranged: data.ranges.is_some(),
            ..ParsedData::default()
        };
        parsed.batch.schema_version = data.schema_version;
        parsed.batch.javascript = javascript;
        let dialect = if javascript {
            ValueDialect::JavaScript
        } else {
            ValueDialect::Crsync
        };
        for (index, change) in data.changes()?.iter().enumerate() {
            match decode_change_with(change, index, dialect) {
                Ok((c, note)) => {
                    parsed.notes.extend(note);
                    parsed.batch.changes.push(c);
                }
                Err(e) if javascript => parsed.notes.push(format!("left out: {e}")),
                Err(e) => return Err(e),
            }
        }
        if let Some(part) = &data.part {
            parsed.batch.part = Some(TxnPart {
                site: part.site.parse().map_err(|e: crate::InvalidSiteId| {
                    DecodeError::BadSiteId {
                        field: "part",
                        reason: e.reason,
                    }
                })?,
                version: DbVersion(part.version),
                after_seq: part.after,
                upto_seq: part.upto,
                more: part.more,
            });
        }
        for (site, (after, upto)) in data.ranges.iter().flatten() {
            let site: SiteId =
                site.parse()
                    .map_err(|e: crate::InvalidSiteId| DecodeError::BadSiteId {
                        field: "ranges",
                        reason: e.reason,
                    })?;
            parsed.batch.ranges.insert(
                site,
                VersionRange {
                    after: DbVersion(*after),
                    upto: DbVersion(*upto),
                },
            );
        }
        Ok(parsed)
    }
}

impl Message {
    /// Parses a transport message. `javascript`: the sender is a v1
    /// (TypeScript) peer, so values follow JavaScript and one undecodable
    /// change is left out instead of refusing the message.
    pub fn parse(
        message: TransportMessage,
        javascript: bool,
    ) -> Result<(SiteId, Message), DecodeError> {
        message.validate()?;
        let sender = message.sender()?;
        let parsed = match message.kind {
            MessageKind::Connect => Message::Connect {
                hello: message.crsync,
            },
            MessageKind::Ping => Message::Ping,
            MessageKind::Sync => {
                let cursor = message.cursor.ok_or(DecodeError::Missing {
                    kind: MessageKind::Sync,
                    field: "cursor",
                })?;
                if message.ack == Some(true) {
                    Message::Ack {
                        cursor,
                        hello: message.crsync,
                    }
                } else {
                    Message::SyncRequest {
                        cursor,
                        hello: message.crsync,
                    }
                }
            }
            MessageKind::Error => {
                let text = message.error.unwrap_or_default();
                let code = match message.code {
                    Some(code) => ErrorCode::parse(&code),
                    None => ErrorCode::from_v1_text(&text),
                };
                Message::Error {
                    code,
                    message: text,
                }
            }
            MessageKind::Data => {
                let data = message.data.ok_or(DecodeError::Missing {
                    kind: MessageKind::Data,
                    field: "data",
                })?;
                let mut parsed = ParsedData::decode(&data, javascript)?;
                parsed.number = message.n.filter(|(first, n)| first <= n);
                parsed.total = message.total;
                Message::Data(parsed)
            }
        };
        Ok((sender, parsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = "0102030405060708090a0b0c0d0e0f10";

    fn parse(json: &str, javascript: bool) -> Result<Message, DecodeError> {
        Message::parse(TransportMessage::from_json(json)?, javascript).map(|(_, m)| m)
    }

    #[test]
    fn a_v1_batch_is_unranged() {
        let json = format!(
            r#"{{"type":"data","peerId":"{SITE}","data":{{"type":"changes","schemaVersion":1,"data":[
            {{"table":"t","pk":"010901","cid":"x","val":"hi","col_version":1,"db_version":4,"site_id":"{SITE}","cl":1,"seq":0}}]}}}}"#
        );
        let Message::Data(data) = parse(&json, true).unwrap() else {
            panic!("not data")
        };
        assert!(!data.ranged && data.batch.ranges.is_empty() && data.batch.javascript);
        assert_eq!(data.batch.schema_version, Some(1));
        assert_eq!(data.batch.changes.len(), 1);
    }

    #[test]
    fn one_bad_change_of_a_javascript_sender_is_left_out() {
        let change = |pk: &str| {
            format!(
                r#"{{"table":"t","pk":"{pk}","cid":"x","val":1,"col_version":1,"db_version":4,"site_id":"{SITE}","cl":1,"seq":0}}"#
            )
        };
        let json = format!(
            r#"{{"type":"data","peerId":"{SITE}","data":{{"type":"changes","data":[{},{}]}}}}"#,
            change("zz"),
            change("010901")
        );
        let Message::Data(data) = parse(&json, true).unwrap() else {
            panic!("not data")
        };
        assert_eq!(data.batch.changes.len(), 1);
        assert_eq!(data.notes.len(), 1);
        assert!(parse(&json, false).is_err());
    }

    #[test]
    fn sync_ack_and_errors() {
        let sync = format!(r#"{{"type":"sync","peerId":"{SITE}","cursor":{{"peers":{{}}}}}}"#);
        assert!(matches!(
            parse(&sync, true).unwrap(),
            Message::SyncRequest { .. }
        ));
        let ack =
            format!(r#"{{"type":"sync","peerId":"{SITE}","ack":true,"cursor":{{"peers":{{}}}}}}"#);
        assert!(matches!(parse(&ack, false).unwrap(), Message::Ack { .. }));
        let v1_error =
            format!(r#"{{"type":"error","peerId":"{SITE}","error":"ALREADY_CONNECTED"}}"#);
        assert!(matches!(
            parse(&v1_error, true).unwrap(),
            Message::Error {
                code: ErrorCode::AlreadyConnected,
                ..
            }
        ));
        let no_cursor = format!(r#"{{"type":"sync","peerId":"{SITE}"}}"#);
        assert!(matches!(
            parse(&no_cursor, true),
            Err(DecodeError::Missing { .. })
        ));
    }
}
