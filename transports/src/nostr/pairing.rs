//! Pairing two devices through their relays.
//!
//! Device A makes an [`Invitation`] (a [`PairingCode`] and a fresh key pair
//! for this pairing) and waits for a request. Device B [`join`]s with the
//! code: it makes its own key pair and publishes a pairing request
//! (gift-wrapped to A's key: the relays see no more than for any message)
//! carrying the one-time secret, its site id and relays. A checks the secret
//! and the expiry (a code works once), stores B and answers with its site
//! id; B stores A. A request with a used, expired or unknown secret is
//! answered with a refusal.

use std::time::Duration;

use crsync_peer::SiteId;
use nostr::{Keys, Kind};
use serde::{Deserialize, Serialize};

use super::code::PairingCode;
use super::envelope::{self, PAIR_KIND};
use super::relay::{FromRelay, RelayPool, RelaySettings, Seen};
use super::state::{DeviceFile, Invite, PairedDevice};
use super::{JITTER_SECS, PairingError, unix_now};

/// How long pairing messages stay on the relays.
const PAIRING_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// How long to wait for one relay to be reachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum PairMessage {
    Request {
        secret: String,
        site: String,
        name: String,
        relays: Vec<String>,
    },
    Accepted {
        site: String,
        name: String,
    },
    Refused {
        reason: String,
    },
}

/// An open invitation: its code, and the wait for the device that joins.
#[derive(Debug)]
pub struct Invitation {
    code: PairingCode,
    keys: Keys,
    file: DeviceFile,
    site: SiteId,
    name: String,
    pool: Option<(RelayPool, tokio::sync::mpsc::Receiver<FromRelay>)>,
}

impl std::fmt::Debug for RelayPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayPool").finish_non_exhaustive()
    }
}

/// How one pairing request ended.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PairingOutcome {
    /// The device is paired (and stored).
    Paired(PairedDevice),
    /// A request was refused (a used, expired or unknown code).
    Refused(String),
}

impl Invitation {
    /// A new invitation of the device with site `site` and name `name`,
    /// valid for `ttl` on `relays`; stored in `file` until used or expired.
    pub fn new(
        file: &DeviceFile,
        site: SiteId,
        name: &str,
        relays: Vec<String>,
        ttl: Duration,
    ) -> Result<Self, PairingError> {
        let relays = relays
            .iter()
            .map(|r| super::check_relay_url(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(PairingError::BadCode)?;
        if relays.is_empty() {
            return Err(PairingError::BadCode("no relay".into()));
        }
        let keys = Keys::generate();
        let secret = hex::encode(rand::random::<[u8; 16]>());
        let expires = unix_now() + ttl.as_secs().max(1);
        file.add_invite(Invite {
            secret: secret.clone(),
            local_secret: keys.secret_key().to_secret_hex(),
            relays: relays.clone(),
            expires,
            used: false,
        })?;
        let code = PairingCode {
            key: keys.public_key(),
            relays,
            secret,
            expires,
            name: name.to_owned(),
        };
        Ok(Invitation {
            code,
            keys,
            file: file.clone(),
            site,
            name: name.to_owned(),
            pool: None,
        })
    }

    /// The code to give the other device.
    pub fn code(&self) -> &PairingCode {
        &self.code
    }

    /// Waits up to `timeout` for the next pairing request and answers it.
    pub async fn next(&mut self, timeout: Duration) -> Result<PairingOutcome, PairingError> {
        if self.pool.is_none() {
            let since = unix_now().saturating_sub(JITTER_SECS + 60);
            let seen = Default::default();
            let pool = RelayPool::connect(
                &self.code.relays,
                self.keys.public_key(),
                since,
                seen,
                RelaySettings::default(),
                CONNECT_TIMEOUT,
            )
            .await?;
            self.pool = Some(pool);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Some((pool, incoming)) = self.pool.as_mut() else {
                return Err(PairingError::NoAnswer);
            };
            let item = tokio::time::timeout_at(deadline, incoming.recv())
                .await
                .map_err(|_| PairingError::NoAnswer)?;
            let Some(FromRelay::Event(event)) = item else {
                if item.is_none() {
                    return Err(PairingError::NoAnswer);
                }
                continue;
            };
            // Looked at once: a copy from another relay is a duplicate.
            pool.settle(&[event.id]);
            let Ok((sender, rumor)) = envelope::unwrap(&self.keys, &event).await else {
                continue;
            };
            if rumor.kind != Kind::Custom(PAIR_KIND) {
                continue;
            }
            let Ok(PairMessage::Request {
                secret,
                site,
                name,
                relays,
            }) = serde_json::from_str(&rumor.content)
            else {
                continue;
            };
            let answer = match self.file.take_invite(&secret)? {
                Ok(_) if site.parse::<SiteId>().is_err() => Err("bad site id"),
                other => other,
            };
            let (reply, outcome) = match answer {
                Ok(invite) => {
                    let relays: Vec<String> = relays
                        .iter()
                        .filter_map(|r| super::check_relay_url(r).ok())
                        .chain(invite.relays)
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    let device = PairedDevice {
                        name: self.file.free_name(&sanitize(&name)),
                        local_secret: invite.local_secret,
                        remote_key: sender.to_hex(),
                        remote_site: Some(site),
                        relays,
                        paired_at: unix_now(),
                        seen_until: 0,
                        remote_epoch: None,
                        remote_cursor: None,
                    };
                    self.file.add(device.clone())?;
                    let reply = PairMessage::Accepted {
                        site: self.site.to_hex(),
                        name: self.name.clone(),
                    };
                    (reply, PairingOutcome::Paired(device))
                }
                Err(reason) => {
                    tracing::info!(%reason, "pairing request refused");
                    (
                        PairMessage::Refused {
                            reason: reason.into(),
                        },
                        PairingOutcome::Refused(reason.into()),
                    )
                }
            };
            let json =
                serde_json::to_string(&reply).map_err(|e| PairingError::Relay(e.to_string()))?;
            let event = envelope::wrap_pairing(&self.keys, &sender, json, PAIRING_EXPIRY)
                .await
                .map_err(PairingError::Relay)?;
            pool.publish(&event, CONNECT_TIMEOUT).await?;
            return Ok(outcome);
        }
    }
}

fn sanitize(name: &str) -> String {
    let name: String = name
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(40)
        .collect();
    if name.is_empty() {
        "device".into()
    } else {
        name
    }
}

/// Joins the device that printed `code`: publishes the pairing request and
/// waits up to `timeout` for its answer; on acceptance stores it in `file`.
///
/// ```no_run
/// # async fn demo(site: crsync_peer::SiteId) -> Result<(), crsync_transports::nostr::PairingError> {
/// use crsync_transports::nostr::{DeviceFile, join};
/// let file = DeviceFile::open_for_db("notes.db")?;
/// let code = "crsync-pair:...".parse()?;
/// let device = join(&file, &code, site, "phone", std::time::Duration::from_secs(60)).await?;
/// println!("paired with {}", device.name);
/// # Ok(()) }
/// ```
pub async fn join(
    file: &DeviceFile,
    code: &PairingCode,
    site: SiteId,
    name: &str,
    timeout: Duration,
) -> Result<PairedDevice, PairingError> {
    if code.expires <= unix_now() {
        return Err(PairingError::Refused("pairing code expired".into()));
    }
    let keys = Keys::generate();
    let since = unix_now().saturating_sub(JITTER_SECS + 60);
    let (pool, mut incoming) = RelayPool::connect(
        &code.relays,
        keys.public_key(),
        since,
        std::sync::Arc::new(std::sync::Mutex::new(Seen::default())),
        RelaySettings::default(),
        CONNECT_TIMEOUT,
    )
    .await?;
    let request = PairMessage::Request {
        secret: code.secret.clone(),
        site: site.to_hex(),
        name: name.to_owned(),
        relays: code.relays.clone(),
    };
    let json = serde_json::to_string(&request).map_err(|e| PairingError::Relay(e.to_string()))?;
    let event = envelope::wrap_pairing(&keys, &code.key, json, PAIRING_EXPIRY)
        .await
        .map_err(PairingError::Relay)?;
    pool.publish(&event, CONNECT_TIMEOUT).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let item = tokio::time::timeout_at(deadline, incoming.recv())
            .await
            .map_err(|_| PairingError::NoAnswer)?;
        let event = match item {
            None => return Err(PairingError::NoAnswer),
            Some(FromRelay::Event(e)) => e,
            Some(_) => continue,
        };
        pool.settle(&[event.id]);
        let Ok((sender, rumor)) = envelope::unwrap(&keys, &event).await else {
            continue;
        };
        if sender != code.key || rumor.kind != Kind::Custom(PAIR_KIND) {
            continue;
        }
        match serde_json::from_str(&rumor.content) {
            Ok(PairMessage::Accepted {
                site: remote_site,
                name: remote_name,
            }) => {
                let remote_site: SiteId = remote_site
                    .parse()
                    .map_err(|_| PairingError::Relay("the answer has a bad site id".into()))?;
                let base = if remote_name.is_empty() {
                    code.name.clone()
                } else {
                    remote_name
                };
                let device = PairedDevice {
                    name: file.free_name(&sanitize(&base)),
                    local_secret: keys.secret_key().to_secret_hex(),
                    remote_key: code.key.to_hex(),
                    remote_site: Some(remote_site.to_hex()),
                    relays: code.relays.clone(),
                    paired_at: unix_now(),
                    seen_until: 0,
                    remote_epoch: None,
                    remote_cursor: None,
                };
                file.add(device.clone())?;
                return Ok(device);
            }
            Ok(PairMessage::Refused { reason }) => return Err(PairingError::Refused(reason)),
            _ => continue,
        }
    }
}
