//! The device file: this replica's relay keys, paired devices and open
//! invitations, kept beside the database as `<db>.nostr.json` with mode 0600.
//!
//! Secret keys live here and nowhere else: never in the database (which
//! syncs), never in logs (`Debug` redacts them). Each pairing has its own key
//! pair, so relays cannot tell that two pairings belong to one device.
//! Writes go to a temporary file that is renamed over the old one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crsync_peer::{Cursor, SiteId};
use nostr::{Keys, PublicKey, SecretKey};
use serde::{Deserialize, Serialize};

/// Version of the file's format.
const FORMAT: u32 = 1;

/// Reading or writing the device file failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The file could not be read or written.
    #[error("device file {path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a device file of a format we read.
    #[error("device file {path} is damaged or of another format: {reason}")]
    Invalid {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No paired device by that name or key.
    #[error("no paired device {0}")]
    UnknownDevice(String),
}

/// One paired device, as the device file holds it.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct PairedDevice {
    /// A short name for lists (`crsync pair list`), from the pairing.
    pub name: String,
    /// Our secret key for this pairing (hex).
    pub(crate) local_secret: String,
    /// The device's public key for this pairing (hex).
    pub remote_key: String,
    /// The device's site id, learned in the pairing.
    pub remote_site: Option<String>,
    /// The relays the device listens on.
    pub relays: Vec<String>,
    /// When the pairing was made (Unix seconds).
    pub paired_at: u64,
    /// The newest (real, unjittered) time of a message from the device that we processed.
    #[serde(default)]
    pub seen_until: u64,
    /// The device's newest session epoch we heard of: `(id hex, started ms)`.
    #[serde(default)]
    pub remote_epoch: Option<(String, u64)>,
    /// What the device last said it holds (its cursor).
    #[serde(default)]
    pub remote_cursor: Option<Cursor>,
}

impl std::fmt::Debug for PairedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairedDevice")
            .field("name", &self.name)
            .field("local_secret", &"<redacted>")
            .field("remote_key", &self.remote_key)
            .field("remote_site", &self.remote_site)
            .field("relays", &self.relays)
            .finish_non_exhaustive()
    }
}

impl PairedDevice {
    /// Our keys for this pairing.
    pub(crate) fn keys(&self) -> Result<Keys, String> {
        SecretKey::from_hex(&self.local_secret)
            .map(Keys::new)
            .map_err(|e| format!("bad secret key for {}: {e}", self.name))
    }

    /// The device's public key.
    pub fn remote_public_key(&self) -> Result<PublicKey, String> {
        PublicKey::from_hex(&self.remote_key)
            .map_err(|e| format!("bad public key for {}: {e}", self.name))
    }

    /// The device's site id, if the pairing told it.
    pub fn site(&self) -> Option<SiteId> {
        self.remote_site.as_deref().and_then(|s| s.parse().ok())
    }
}

/// An invitation this device printed (a pairing code), until used or expired.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Invite {
    pub(crate) secret: String,
    pub(crate) local_secret: String,
    pub(crate) relays: Vec<String>,
    pub(crate) expires: u64,
    pub(crate) used: bool,
}

#[derive(Clone, Serialize, Deserialize, Default, PartialEq)]
struct FileData {
    format: u32,
    #[serde(default)]
    devices: BTreeMap<String, PairedDevice>,
    #[serde(default)]
    invites: Vec<Invite>,
}

/// The device file of one database, shared by the dialers and the pairing
/// code of one process (clones share it). Every change is written at once.
///
/// ```no_run
/// # fn demo() -> Result<(), crsync_transports::nostr::StateError> {
/// use crsync_transports::nostr::DeviceFile;
/// let file = DeviceFile::open_for_db("notes.db")?;
/// for device in file.devices() {
///     println!("{} via {:?}", device.name, device.relays);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DeviceFile {
    path: PathBuf,
    data: Arc<Mutex<FileData>>,
}

impl std::fmt::Debug for DeviceFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl DeviceFile {
    /// The device file of the database at `db` (`<db>.nostr.json`), read
    /// if it exists, else empty (created on the first change).
    pub fn open_for_db(db: impl AsRef<Path>) -> Result<Self, StateError> {
        let mut name = db.as_ref().as_os_str().to_owned();
        name.push(".nostr.json");
        Self::open(PathBuf::from(name))
    }

    /// The device file at `path`.
    pub fn open(path: PathBuf) -> Result<Self, StateError> {
        let data = match std::fs::read(&path) {
            Ok(bytes) => {
                let data: FileData =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::Invalid {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if data.format != FORMAT {
                    return Err(StateError::Invalid {
                        path,
                        reason: format!("format {} (this build reads {FORMAT})", data.format),
                    });
                }
                data
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileData {
                format: FORMAT,
                ..FileData::default()
            },
            Err(source) => return Err(StateError::Io { path, source }),
        };
        Ok(DeviceFile {
            path,
            data: Arc::new(Mutex::new(data)),
        })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, FileData> {
        self.data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every paired device, by name.
    pub fn devices(&self) -> Vec<PairedDevice> {
        self.lock().devices.values().cloned().collect()
    }

    /// One paired device, by name or by its public key.
    pub fn device(&self, name_or_key: &str) -> Option<PairedDevice> {
        let data = self.lock();
        data.devices.get(name_or_key).cloned().or_else(|| {
            data.devices
                .values()
                .find(|d| d.remote_key == name_or_key)
                .cloned()
        })
    }

    /// Removes a paired device (unpairing): its events are no longer read
    /// and nothing more is sent to it.
    pub fn remove(&self, name_or_key: &str) -> Result<PairedDevice, StateError> {
        let removed = {
            let mut data = self.lock();
            let name = data
                .devices
                .iter()
                .find(|(n, d)| *n == name_or_key || d.remote_key == name_or_key)
                .map(|(n, _)| n.clone())
                .ok_or_else(|| StateError::UnknownDevice(name_or_key.to_owned()))?;
            data.devices.remove(&name)
        };
        self.save()?;
        removed.ok_or_else(|| StateError::UnknownDevice(name_or_key.to_owned()))
    }

    /// Adds (or replaces, by name) a paired device.
    pub(crate) fn add(&self, device: PairedDevice) -> Result<(), StateError> {
        self.lock().devices.insert(device.name.clone(), device);
        self.save()
    }

    /// A name not yet taken, from `base`.
    pub(crate) fn free_name(&self, base: &str) -> String {
        let data = self.lock();
        let mut name = base.to_owned();
        let mut i = 2;
        while data.devices.contains_key(&name) {
            name = format!("{base}-{i}");
            i += 1;
        }
        name
    }

    /// Changes one device's record (if it is still paired) and saves.
    pub(crate) fn update(
        &self,
        remote_key: &str,
        f: impl FnOnce(&mut PairedDevice),
    ) -> Result<(), StateError> {
        {
            let mut data = self.lock();
            let Some(d) = data
                .devices
                .values_mut()
                .find(|d| d.remote_key == remote_key)
            else {
                return Ok(());
            };
            f(d);
        }
        self.save()
    }

    pub(crate) fn add_invite(&self, invite: Invite) -> Result<(), StateError> {
        {
            let mut data = self.lock();
            let now = super::unix_now();
            data.invites.retain(|i| !i.used && i.expires > now);
            data.invites.push(invite);
        }
        self.save()
    }

    /// Takes the invitation with this secret: `Ok(invite)` if it is open,
    /// else why not. A taken invitation is used up (saved before returning).
    pub(crate) fn take_invite(
        &self,
        secret: &str,
    ) -> Result<Result<Invite, &'static str>, StateError> {
        let now = super::unix_now();
        let outcome = {
            let mut data = self.lock();
            match data.invites.iter_mut().find(|i| i.secret == secret) {
                None => Err("unknown pairing code"),
                Some(i) if i.used => Err("pairing code already used"),
                Some(i) if i.expires <= now => Err("pairing code expired"),
                Some(i) => {
                    i.used = true;
                    Ok(i.clone())
                }
            }
        };
        if outcome.is_ok() {
            self.save()?;
        }
        Ok(outcome)
    }

    /// Writes the file (0600), through a temporary file renamed over it.
    fn save(&self) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(&*self.lock()).map_err(|e| StateError::Invalid {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        write_private(&tmp, &bytes).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}
