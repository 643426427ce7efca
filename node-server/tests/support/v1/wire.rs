//! Wire protocol v1 exactly as the TypeScript peer writes and reads it: no `ranges`, no
//! `crsync`, no `ack`, no `code`; unknown fields are ignored on receipt.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value as Json;

use super::js::{JsValue, js_number, json_string};

/// A cursor as a v1 peer sends it: site id hex -> highest `db_version` in its `crsql_changes`.
pub type V1Cursor = BTreeMap<String, i64>;

/// One row of `crsql_changes` (`pk` and `site_id` as bytes; hex on the wire).
#[derive(Debug, Clone, PartialEq)]
pub struct V1Change {
    pub table: String,
    pub pk: Vec<u8>,
    pub cid: String,
    pub val: JsValue,
    pub col_version: i64,
    pub db_version: i64,
    pub site_id: Vec<u8>,
    pub cl: i64,
    pub seq: i64,
}

/// `PeerMessage.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1Kind {
    Changes,
    Eose,
}

impl V1Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            V1Kind::Changes => "changes",
            V1Kind::Eose => "eose",
        }
    }
}

/// `PeerMessage`.
#[derive(Debug, Clone, PartialEq)]
pub struct V1PeerMessage {
    pub kind: V1Kind,
    pub changes: Vec<V1Change>,
    pub schema_version: Option<i64>,
}

/// `TransportMessage`.
#[derive(Debug, Clone, PartialEq)]
pub enum V1Message {
    Connect { peer: String },
    Sync { peer: String, cursor: V1Cursor },
    Data { peer: String, data: V1PeerMessage },
    Ping { peer: String },
    Error { peer: String, error: String },
}

/// What decoding a received message noticed beyond what v1 defines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    /// Values that were crsync `$`-tagged objects (a v1 peer never asked for them).
    pub tagged_values: usize,
}

impl V1Message {
    /// The sender's peer id.
    pub fn peer(&self) -> &str {
        match self {
            V1Message::Connect { peer }
            | V1Message::Sync { peer, .. }
            | V1Message::Data { peer, .. }
            | V1Message::Ping { peer }
            | V1Message::Error { peer, .. } => peer,
        }
    }

    /// `JSON.stringify(message)`.
    pub fn to_json(&self) -> String {
        match self {
            V1Message::Connect { peer } => {
                format!(r#"{{"type":"connect","peerId":{}}}"#, json_string(peer))
            }
            V1Message::Ping { peer } => {
                format!(r#"{{"type":"ping","peerId":{}}}"#, json_string(peer))
            }
            V1Message::Error { peer, error } => format!(
                r#"{{"type":"error","peerId":{},"error":{}}}"#,
                json_string(peer),
                json_string(error)
            ),
            V1Message::Sync { peer, cursor } => format!(
                r#"{{"type":"sync","peerId":{},"cursor":{}}}"#,
                json_string(peer),
                cursor_json(cursor)
            ),
            V1Message::Data { peer, data } => format!(
                r#"{{"type":"data","peerId":{},"data":{}}}"#,
                json_string(peer),
                peer_message_json(data)
            ),
        }
    }

    /// `JSON.parse` of a received message (unknown fields ignored).
    pub fn parse(text: &str) -> Result<(Self, Extras)> {
        let json: Json = serde_json::from_str(text).context("not JSON")?;
        let field = |name: &str| json.get(name);
        let peer = field("peerId")
            .and_then(Json::as_str)
            .ok_or_else(|| anyhow!("no peerId in {text}"))?
            .to_owned();
        let mut extras = Extras::default();
        let message = match field("type").and_then(Json::as_str) {
            Some("connect") => V1Message::Connect { peer },
            Some("ping") => V1Message::Ping { peer },
            Some("error") => V1Message::Error {
                peer,
                error: field("error")
                    .and_then(Json::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            },
            Some("sync") => V1Message::Sync {
                peer,
                cursor: parse_cursor(
                    field("cursor").ok_or_else(|| anyhow!("sync without cursor"))?,
                )?,
            },
            Some("data") => {
                let data = field("data").ok_or_else(|| anyhow!("data without data"))?;
                V1Message::Data {
                    peer,
                    data: parse_peer_message(data, &mut extras)?,
                }
            }
            other => bail!("unknown message type {other:?}"),
        };
        Ok((message, extras))
    }
}

fn cursor_json(cursor: &V1Cursor) -> String {
    let entries: Vec<String> = cursor
        .iter()
        .map(|(site, v)| format!("{}:{}", json_string(site), js_number(*v as f64)))
        .collect();
    format!(r#"{{"peers":{{{}}}}}"#, entries.join(","))
}

fn peer_message_json(message: &V1PeerMessage) -> String {
    let changes: Vec<String> = message.changes.iter().map(change_json).collect();
    let schema = message
        .schema_version
        .map(|v| format!(r#","schemaVersion":{}"#, js_number(v as f64)))
        .unwrap_or_default();
    format!(
        r#"{{"type":"{}","data":[{}]{schema}}}"#,
        message.kind.as_str(),
        changes.join(",")
    )
}

fn change_json(c: &V1Change) -> String {
    format!(
        r#"{{"table":{},"pk":"{}","cid":{},"val":{},"col_version":{},"db_version":{},"site_id":"{}","cl":{},"seq":{}}}"#,
        json_string(&c.table),
        hex::encode(&c.pk),
        json_string(&c.cid),
        c.val.to_json(),
        js_number(c.col_version as f64),
        js_number(c.db_version as f64),
        hex::encode(&c.site_id),
        js_number(c.cl as f64),
        js_number(c.seq as f64),
    )
}

/// A JSON number read as JavaScript does (a double), then used as an integer.
fn js_integer(value: Option<&Json>, what: &str) -> Result<i64> {
    let f = value
        .and_then(Json::as_f64)
        .ok_or_else(|| anyhow!("{what} is not a number"))?;
    Ok(f as i64)
}

pub fn parse_cursor(json: &Json) -> Result<V1Cursor> {
    let peers = json
        .get("peers")
        .and_then(Json::as_object)
        .ok_or_else(|| anyhow!("cursor without peers: {json}"))?;
    peers
        .iter()
        .map(|(site, v)| Ok((site.clone(), js_integer(Some(v), "cursor entry")?)))
        .collect()
}

fn parse_peer_message(json: &Json, extras: &mut Extras) -> Result<V1PeerMessage> {
    let kind = match json.get("type").and_then(Json::as_str) {
        Some("changes") => V1Kind::Changes,
        Some("eose") => V1Kind::Eose,
        other => bail!("unknown PeerMessage type {other:?}"),
    };
    let mut changes = Vec::new();
    for c in json
        .get("data")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let text = |name: &str| -> Result<String> {
            Ok(c.get(name)
                .and_then(Json::as_str)
                .ok_or_else(|| anyhow!("change without {name}: {c}"))?
                .to_owned())
        };
        let (val, tagged) = JsValue::from_json(c.get("val").unwrap_or(&Json::Null))
            .map_err(|e| anyhow!("val of {c}: {e}"))?;
        extras.tagged_values += usize::from(tagged);
        changes.push(V1Change {
            table: text("table")?,
            pk: hex::decode(text("pk")?).context("pk hex")?,
            cid: text("cid")?,
            val,
            col_version: js_integer(c.get("col_version"), "col_version")?,
            db_version: js_integer(c.get("db_version"), "db_version")?,
            site_id: hex::decode(text("site_id")?).context("site_id hex")?,
            cl: js_integer(c.get("cl"), "cl")?,
            seq: js_integer(c.get("seq"), "seq")?,
        });
    }
    Ok(V1PeerMessage {
        kind,
        changes,
        schema_version: json.get("schemaVersion").and_then(Json::as_i64),
    })
}
