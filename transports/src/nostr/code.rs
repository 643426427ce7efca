//! Pairing codes: `crsync-pair:<public key hex>?relay=<url>&...&secret=<hex>&exp=<unix s>&name=<name>`.
//!
//! The code carries the inviting device's public key for this pairing, the
//! relays it listens on, a one-time secret and when the code expires. It is
//! a secret itself (whoever holds it can pair, once, until it expires): show
//! it only to the device that joins.

use nostr::PublicKey;

/// What a pairing code says.
///
/// ```
/// use crsync_transports::nostr::PairingCode;
/// let code: PairingCode = "crsync-pair:79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798\
///     ?relay=ws%3A%2F%2F127.0.0.1%3A7777&secret=00ff&exp=4102444800&name=laptop".parse()?;
/// assert_eq!(code.relays, ["ws://127.0.0.1:7777"]);
/// assert_eq!(code.name, "laptop");
/// assert_eq!(code.to_string().parse::<PairingCode>()?, code);
/// # Ok::<(), crsync_transports::nostr::PairingError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct PairingCode {
    /// The inviting device's public key for this pairing.
    pub key: PublicKey,
    /// Relays it listens on (`ws://` or `wss://`).
    pub relays: Vec<String>,
    /// The one-time secret (hex).
    pub secret: String,
    /// Expiry, Unix seconds.
    pub expires: u64,
    /// The inviting device's name.
    pub name: String,
}

impl std::fmt::Debug for PairingCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairingCode")
            .field("key", &self.key.to_hex())
            .field("relays", &self.relays)
            .field("secret", &"<redacted>")
            .field("expires", &self.expires)
            .field("name", &self.name)
            .finish()
    }
}

const SCHEME: &str = "crsync-pair:";

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str) -> Result<String, super::PairingError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or_else(|| bad("truncated %-escape"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad("bad %-escape"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad("not UTF-8"))
}

fn bad(why: &str) -> super::PairingError {
    super::PairingError::BadCode(why.to_owned())
}

impl std::fmt::Display for PairingCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}?", self.key.to_hex())?;
        for r in &self.relays {
            write!(f, "relay={}&", encode(r))?;
        }
        write!(
            f,
            "secret={}&exp={}&name={}",
            self.secret,
            self.expires,
            encode(&self.name)
        )
    }
}

impl std::str::FromStr for PairingCode {
    type Err = super::PairingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("it does not start with crsync-pair:"))?;
        let (key, query) = rest.split_once('?').ok_or_else(|| bad("no parameters"))?;
        let key = PublicKey::from_hex(key).map_err(|_| bad("bad public key"))?;
        let (mut relays, mut secret, mut expires, mut name) = (Vec::new(), None, None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad("parameter without value"))?;
            let v = decode(v)?;
            match k {
                "relay" => relays.push(super::check_relay_url(&v).map_err(|e| bad(&e))?),
                "secret" if v.len() >= 16 || v.chars().all(|c| c.is_ascii_hexdigit()) => {
                    secret = Some(v)
                }
                "exp" => expires = Some(v.parse().map_err(|_| bad("bad expiry"))?),
                "name" => name = Some(v),
                _ => {}
            }
        }
        if relays.is_empty() {
            return Err(bad("no relay"));
        }
        Ok(PairingCode {
            key,
            relays,
            secret: secret.ok_or_else(|| bad("no secret"))?,
            expires: expires.ok_or_else(|| bad("no expiry"))?,
            name: name.unwrap_or_else(|| "device".into()),
        })
    }
}
