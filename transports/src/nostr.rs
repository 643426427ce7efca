//! Sync through Nostr relays: end-to-end encrypted, store-and-forward, so
//! two devices sync even when they are never online at the same time.
//!
//! - **Pairing** ([`Invitation`], [`join`], [`PairingCode`]): one device
//!   prints a code (its key for this pairing, its relays, a one-time secret,
//!   an expiry); the other joins with it through the relays. Both store the
//!   other in their [`DeviceFile`] (`<db>.nostr.json`, mode 0600: the secret
//!   keys live there, never in the database or in logs).
//! - **Privacy**: every message is a NIP-59 gift wrap (kind 1059, signed by
//!   a one-time key, only a `p` tag for the recipient's pairing key, a
//!   randomised time, a NIP-40 `expiration`), around a seal signed by the
//!   sender's pairing key, around the message: NIP-44 v2 twice. Each pairing
//!   has its own keys, so a relay cannot link two pairings of one device.
//! - **Protocol**: the Peer's own sync protocol (`connect`, `sync`, numbered
//!   `data` batches, `eose`, acknowledgements) in the rumors; batches are cut
//!   small for relays ([`NostrDialer`]'s [`LinkSettings`]) and any message
//!   too large for one event (60 KiB) goes in numbered fragments that the
//!   receiver puts back together in bounded memory. See `link.rs` for how
//!   sessions that start and end independently, stored events in any order,
//!   duplicates from several relays and an absent device are handled.
//! - **Relays** (`relay.rs`): one socket and one subscription per relay
//!   and paired device, `OK` handling, back-off on `rate-limited:`,
//!   reconnects; WebSocket pings, and a socket that stays silent for two
//!   of their intervals is replaced ([`RelaySettings`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use crsync_peer::{Peer, Store};
//! use crsync_transports::nostr::{DeviceFile, NostrDialer};
//!
//! let store = Store::open("notes.db").await?;
//! let file = DeviceFile::open_for_db("notes.db")?;
//! let peer = Peer::builder(store).build();
//! for device in file.devices() {
//!     peer.add_dialer(NostrDialer::new(file.clone(), &device.remote_key)?);
//! }
//! # Ok(()) }
//! ```

mod code;
mod envelope;
mod link;
mod pairing;
mod relay;
mod state;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crsync_peer::{Connection, Dialer, LinkSettings, SiteId, TransportError};
use futures_util::future::{BoxFuture, FutureExt};

pub use code::PairingCode;
pub use pairing::{Invitation, PairingOutcome, join};
pub use relay::RelaySettings;
pub use state::{DeviceFile, PairedDevice, StateError};

use envelope::Epoch;

/// How far NIP-59 moves a wrapper's time into the past at most (2 days).
pub(crate) const JITTER_SECS: u64 = 2 * 24 * 3600;
/// Default life of a published event on the relays (NIP-40): a week.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default acknowledgement timeout on a relay link: the remote may be away
/// for days, and a resend while it is away only stores the same events again.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(3600);
/// Batches in flight on a relay link (what an absent device finds waiting).
pub const DEFAULT_WINDOW: usize = 16;
/// Soft limit on one batch's estimated size: one batch, one event.
pub const DEFAULT_BATCH_BYTES: usize = 16 * 1024;

/// Pairing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PairingError {
    /// The code is not a pairing code.
    #[error("bad pairing code: {0}")]
    BadCode(String),
    /// The other device refused (code used, expired or unknown).
    #[error("pairing refused: {0}")]
    Refused(String),
    /// No answer in time.
    #[error(
        "no answer from the other device in time (is `crsync pair invite` still running there?)"
    )]
    NoAnswer,
    /// The relays failed us.
    #[error("relay: {0}")]
    Relay(String),
    /// The device file.
    #[error(transparent)]
    State(#[from] StateError),
}

impl From<TransportError> for PairingError {
    fn from(e: TransportError) -> Self {
        PairingError::Relay(e.to_string())
    }
}

pub(crate) fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

pub(crate) fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A relay URL we can dial (`ws://` or `wss://`), trimmed.
pub(crate) fn check_relay_url(url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("wss://")
        .or_else(|| url.strip_prefix("ws://"))
        .ok_or_else(|| format!("relay {url:?} is not a ws:// or wss:// URL"))?;
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(format!("relay {url:?} has no host"));
    }
    #[cfg(not(feature = "tls"))]
    if url.starts_with("wss://") {
        return Err(format!("relay {url:?}: wss:// needs the `tls` feature"));
    }
    Ok(url.to_owned())
}

/// Dials one paired device through its relays (see the [module docs](self)).
///
/// Each dial opens a socket per relay, asks for the device's stored events
/// since the last processed one (less the two days a wrapper's time may be
/// moved back), and is a new session: it announces itself (`connect`,
/// `sync` with our cursor) for the device to answer whenever it is online.
///
/// ```no_run
/// # fn demo(file: crsync_transports::nostr::DeviceFile) -> Result<(), Box<dyn std::error::Error>> {
/// use crsync_transports::nostr::NostrDialer;
/// use std::time::Duration;
/// let dialer = NostrDialer::new(file, "laptop")?
///     .with_relays(vec!["wss://relay.example".into()])
///     .with_expiry(Duration::from_secs(3 * 24 * 3600));
/// # let _ = dialer; Ok(()) }
/// ```
#[derive(Clone)]
pub struct NostrDialer {
    file: DeviceFile,
    remote_key: String,
    name: String,
    relays: Vec<String>,
    expiry: Duration,
    settings: LinkSettings,
    relay_settings: RelaySettings,
    dial_timeout: Duration,
    /// Events settled (handed to the Peer or discarded) by any dial.
    seen: Arc<Mutex<relay::Seen>>,
}

impl std::fmt::Debug for NostrDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NostrDialer")
            .field("device", &self.name)
            .field("relays", &self.relays)
            .finish_non_exhaustive()
    }
}

impl NostrDialer {
    /// A dialer for the paired device `device` (its name or public key) of `file`.
    pub fn new(file: DeviceFile, device: &str) -> Result<Self, StateError> {
        let d = file
            .device(device)
            .ok_or_else(|| StateError::UnknownDevice(device.to_owned()))?;
        Ok(NostrDialer {
            remote_key: d.remote_key.clone(),
            name: d.name.clone(),
            relays: d.relays.clone(),
            file,
            expiry: DEFAULT_EXPIRY,
            settings: LinkSettings::default()
                .with_liveness_timeout(None)
                .with_ping_interval(Duration::from_secs(24 * 3600))
                .with_ack_timeout(DEFAULT_ACK_TIMEOUT)
                .with_window(DEFAULT_WINDOW)
                .with_max_batch_bytes(DEFAULT_BATCH_BYTES),
            relay_settings: RelaySettings::default(),
            dial_timeout: crate::DEFAULT_DIAL_TIMEOUT,
            seen: Default::default(),
        })
    }

    /// Uses these relays instead of the ones stored with the device.
    pub fn with_relays(mut self, relays: Vec<String>) -> Self {
        self.relays = relays;
        self
    }

    /// How long published events stay on the relays (NIP-40; default a week).
    pub fn with_expiry(mut self, expiry: Duration) -> Self {
        self.expiry = expiry;
        self
    }

    /// How long to wait for an acknowledgement before sending again (default an hour).
    pub fn with_ack_timeout(mut self, timeout: Duration) -> Self {
        self.settings = self.settings.with_ack_timeout(timeout);
        self
    }

    /// Limit on reaching at least one relay (default [`DEFAULT_DIAL_TIMEOUT`](crate::DEFAULT_DIAL_TIMEOUT)).
    pub fn with_dial_timeout(mut self, timeout: Duration) -> Self {
        self.dial_timeout = timeout;
        self
    }

    /// How the relay sockets are watched: pings, and when a silent one is
    /// replaced (default: a ping every 30 s, replaced after 60 s of silence).
    pub fn with_relay_settings(mut self, settings: RelaySettings) -> Self {
        self.relay_settings = settings;
        self
    }

    /// The relays this dials.
    pub fn relays(&self) -> &[String] {
        &self.relays
    }

    async fn connect(&self, _local: SiteId) -> Result<Connection, TransportError> {
        let device = self
            .file
            .device(&self.remote_key)
            .ok_or_else(|| TransportError::Remote {
                code: crsync_peer::proto::ErrorCode::Forbidden,
                message: format!("device {} is no longer paired", self.name),
            })?;
        let bad = |e: String| TransportError::Io(e.into());
        let keys = device.keys().map_err(bad)?;
        let remote = device.remote_public_key().map_err(bad)?;
        let relays = self
            .relays
            .iter()
            .map(|r| check_relay_url(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let start = if device.seen_until > 0 {
            device.seen_until
        } else {
            device.paired_at
        };
        let since = start.saturating_sub(JITTER_SECS + 60);
        let (pool, incoming) = relay::RelayPool::connect(
            &relays,
            keys.public_key(),
            since,
            self.seen.clone(),
            self.relay_settings,
            self.dial_timeout,
        )
        .await?;
        let known_epoch = device.remote_epoch.as_ref().and_then(|(id, started)| {
            u64::from_str_radix(id, 16).ok().map(|id| Epoch {
                started: *started,
                id,
            })
        });
        Ok(link::connection(link::LinkParts {
            keys,
            remote,
            remote_site: device.site(),
            pool: Arc::new(pool),
            incoming,
            expiry: self.expiry,
            file: self.file.clone(),
            label: self.label(),
            known_epoch,
            remote_cursor: device.remote_cursor.clone(),
            seen_until: device.seen_until,
        }))
    }
}

impl Dialer for NostrDialer {
    fn dial(&mut self, local: SiteId) -> BoxFuture<'_, Result<Connection, TransportError>> {
        self.connect(local).boxed()
    }

    fn label(&self) -> String {
        format!("nostr {} via {}", self.name, self.relays.join(" "))
    }

    fn link_settings(&self) -> LinkSettings {
        self.settings
    }
}
