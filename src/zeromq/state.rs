//! `storage/broker-state.json`: what survives a restart of kiwimq's broker besides the
//! tasks — who subscribed what, each client's limit, and who holds which task since when.
//!
//! Written (durably: a temporary, synced, renamed, the directory synced) before a task
//! leaves the broker, so a restarted broker knows the task is taken. Read once at start: a
//! file that does not decode is moved aside (`broker-state.json.unreadable`) and reported,
//! and the broker starts without it — its holders' tasks then go out again.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::service::replace_durably;

/// One hand-over as written down.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct HandOver {
    /// Its delivery number.
    pub(crate) delivery: u64,
    /// When it was handed over, in seconds since the epoch.
    pub(crate) at: f64,
}

/// The file's content. Fields added since the first version default, so an older file
/// still reads.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct PersistedState {
    /// Identifier → client identity (hex).
    #[serde(default)]
    pub(crate) task_subscribers: HashMap<String, String>,
    #[serde(default)]
    pub(crate) rpc_subscribers: HashMap<String, String>,
    /// Client identity (hex) → its prefetch (`None` unlimited).
    #[serde(default)]
    pub(crate) prefetch: HashMap<String, Option<u32>>,
    /// Task id → the identity (hex) it was handed to.
    #[serde(default)]
    pub(crate) assignments: HashMap<String, String>,
    /// Task id → its hand-over (a file from before delivery numbers has none).
    #[serde(default)]
    pub(crate) deliveries: HashMap<String, HandOver>,
    /// The next delivery number to give.
    #[serde(default)]
    pub(crate) next_delivery: u64,
    /// Task id → the identity (hex) its result goes back to.
    #[serde(default)]
    pub(crate) result_routes: HashMap<String, String>,
}

impl PersistedState {
    /// Reads `path`: nothing when it is missing; when it does not decode, it is moved aside
    /// and nothing is read.
    pub(crate) fn load(path: &Path) -> Self {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Self::default(),
            Err(error) => {
                tracing::error!(%error, "cannot read broker-state.json; starting without it");
                return Self::default();
            }
        };
        match Self::decode(&bytes) {
            Ok(state) => state,
            Err(error) => {
                let aside = path.with_extension("json.unreadable");
                let moved = std::fs::rename(path, &aside);
                tracing::error!(
                    %error, moved_aside = moved.is_ok(),
                    "broker-state.json does not decode (moved to broker-state.json.unreadable); \
                     starting without it: tasks held before the stop go out again"
                );
                Self::default()
            }
        }
    }

    /// Decodes the file's bytes.
    pub(crate) fn decode(bytes: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(bytes)
    }

    /// Writes it to `path`, durably.
    pub(crate) fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        replace_durably(path, &bytes)
    }
}

/// A client's identity in hex, as the file keeps it.
pub(crate) fn hex(identity: &[u8]) -> String {
    identity.iter().map(|b| format!("{b:02x}")).collect()
}

/// The identity a hex text names; `None` for text that is not hex.
pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    // `from_str_radix` takes a sign: "+f" would read as 0x0f (found by fuzzing).
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        assert_eq!(
            unhex(&hex(b"client-1\x00\xff")).unwrap(),
            b"client-1\x00\xff"
        );
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("é1"), None);
    }

    /// Found by fuzzing (broker_state): "+1" read as the identity 0x01, which writes back
    /// as "01", so two texts named one client.
    #[test]
    fn a_sign_is_not_hex() {
        assert_eq!(unhex("+1"), None);
        assert_eq!(unhex("23656e74+d31"), None);
        assert_eq!(unhex("2B"), Some(vec![0x2b]));
    }

    #[test]
    fn a_file_of_the_first_version_reads() {
        let state = PersistedState::decode(
            br#"{"task_subscribers":{"t":"61"},"rpc_subscribers":{},"prefetch":{"61":3},
                "assignments":{"x":"61"},"result_routes":{}}"#,
        )
        .unwrap();
        assert_eq!(state.assignments["x"], "61");
        assert!(state.deliveries.is_empty());
    }

    #[test]
    fn a_file_that_does_not_decode_is_moved_aside_not_lost() {
        let dir = std::env::temp_dir().join(format!("kiwimq-state-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("broker-state.json");
        std::fs::write(&path, b"").unwrap();
        assert!(PersistedState::load(&path).assignments.is_empty());
        assert!(dir.join("broker-state.json.unreadable").exists());
        let state = PersistedState {
            next_delivery: 7,
            ..PersistedState::default()
        };
        state.save(&path).unwrap();
        assert_eq!(PersistedState::load(&path).next_delivery, 7);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
