//! `storage/broker-state.json`: what survives a restart of kiwimq's broker besides the
//! tasks — who subscribed what, each client's limit, and who holds which task since when.
//!
//! Two files: a snapshot, `broker-state.json`, written durably (a temporary, synced,
//! renamed, the directory synced) at most every tick while something changed, and
//! `broker-state.log`, where every change between two snapshots is appended as a line
//! *before* it takes effect outside (a hand-over is written down before the task leaves).
//! The log is written, not synced: it is there for the broker's own death (`kill -9`, a
//! crash), which the kernel's page cache survives; a power cut, which it may not survive,
//! stops the broker's clients too — they reach it over IPC, on this machine — so no client
//! still runs a task whose hand-over the cut took. A snapshot empties the log.
//!
//! Read once at start: the snapshot, then the log's lines over it (a last line cut short is
//! skipped). A snapshot that does not decode is moved aside (`broker-state.json.unreadable`)
//! and reported, and the broker starts from the log alone.

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
    /// The ids of the tasks acked last (at most [`ACKED_KEPT`]), oldest first: a task sent
    /// again after its confirm was lost to a stop is confirmed again, not run again.
    #[serde(default)]
    pub(crate) recently_acked: Vec<String>,
}

/// How many ids of acked tasks the state keeps across a restart.
pub(crate) const ACKED_KEPT: usize = 10_000;

/// One change to the state, as a line of `broker-state.log`. Identities in hex.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub(crate) enum Change {
    SubscribeTask {
        identifier: String,
        client: String,
        limit: Option<u32>,
    },
    UnsubscribeTask {
        identifier: String,
        client: String,
    },
    SubscribeRpc {
        identifier: String,
        client: String,
    },
    UnsubscribeRpc {
        identifier: String,
        client: String,
    },
    /// A task handed over; `route`, where its result goes.
    Assign {
        task: String,
        client: String,
        delivery: u64,
        at: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        route: Option<String>,
    },
    /// A task no one holds any more (settled — `acked` — or back in the queue).
    Release {
        task: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        acked: bool,
    },
    /// A client gone: its subscriptions and limit.
    RemoveClient {
        client: String,
    },
}

impl PersistedState {
    /// Applies one change, as the broker made it.
    pub(crate) fn apply(&mut self, change: Change) {
        match change {
            Change::SubscribeTask {
                identifier,
                client,
                limit,
            } => {
                self.prefetch.insert(client.clone(), limit);
                self.task_subscribers.insert(identifier, client);
            }
            Change::UnsubscribeTask { identifier, client } => {
                if self.task_subscribers.get(&identifier) == Some(&client) {
                    self.task_subscribers.remove(&identifier);
                }
                if !self.task_subscribers.values().any(|c| *c == client) {
                    self.prefetch.remove(&client);
                }
            }
            Change::SubscribeRpc { identifier, client } => {
                self.rpc_subscribers.insert(identifier, client);
            }
            Change::UnsubscribeRpc { identifier, client } => {
                if self.rpc_subscribers.get(&identifier) == Some(&client) {
                    self.rpc_subscribers.remove(&identifier);
                }
            }
            Change::Assign {
                task,
                client,
                delivery,
                at,
                route,
            } => {
                self.next_delivery = self.next_delivery.max(delivery.saturating_add(1));
                self.deliveries
                    .insert(task.clone(), HandOver { delivery, at });
                if let Some(route) = route {
                    self.result_routes.insert(task.clone(), route);
                }
                self.assignments.insert(task, client);
            }
            Change::Release { task, acked } => {
                self.assignments.remove(&task);
                self.deliveries.remove(&task);
                if acked {
                    if self.recently_acked.len() >= ACKED_KEPT {
                        let over = self.recently_acked.len() + 1 - ACKED_KEPT;
                        self.recently_acked.drain(..over);
                    }
                    self.recently_acked.push(task);
                }
            }
            Change::RemoveClient { client } => {
                self.task_subscribers.retain(|_, c| *c != client);
                self.rpc_subscribers.retain(|_, c| *c != client);
                self.prefetch.remove(&client);
            }
        }
    }

    /// The state a snapshot at `snapshot` and the log at `log` say, as [`load`] and
    /// [`StateLog::replay`] read them.
    ///
    /// [`load`]: Self::load
    pub(crate) fn restore(snapshot: &Path, log: &Path) -> Self {
        let mut state = Self::load(snapshot);
        StateLog::replay(log, &mut state);
        state
    }

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

/// `broker-state.log`: the changes since the last snapshot, one JSON line each.
#[derive(Debug)]
pub(crate) struct StateLog {
    file: std::fs::File,
    /// Lines since it was emptied.
    lines: usize,
}

impl StateLog {
    /// Opens the log at `path` for appending (read it first: [`replay`](Self::replay)).
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self { file, lines: 0 })
    }

    /// Appends `changes` in one write; whether they were written (an error is reported:
    /// the next snapshot holds them).
    pub(crate) fn record(&mut self, changes: &[Change]) -> bool {
        use std::io::Write;
        if changes.is_empty() {
            return true;
        }
        let mut text = Vec::with_capacity(changes.len() * 128);
        for change in changes {
            if serde_json::to_writer(&mut text, change).is_ok() {
                text.push(b'\n');
            }
        }
        match self.file.write_all(&text) {
            Ok(()) => {
                self.lines += changes.len();
                true
            }
            Err(error) => {
                tracing::error!(%error, "cannot write broker-state.log");
                false
            }
        }
    }

    /// Lines since the last snapshot.
    pub(crate) fn lines(&self) -> usize {
        self.lines
    }

    /// Empties it (a snapshot holds everything it said).
    pub(crate) fn clear(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.lines = 0;
        Ok(())
    }

    /// Applies the log at `path` over `state`: every line that reads, in order.
    pub(crate) fn replay(path: &Path, state: &mut PersistedState) {
        let Ok(bytes) = std::fs::read(path) else {
            return;
        };
        let mut skipped = 0;
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Change>(line) {
                Ok(change) => state.apply(change),
                Err(_) => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "lines of broker-state.log that do not read were skipped"
            );
        }
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
    fn the_log_over_the_snapshot_gives_the_state_and_a_line_cut_short_is_skipped() {
        let dir = std::env::temp_dir().join(format!("kiwimq-state-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let (snapshot, log_path) = (dir.join("broker-state.json"), dir.join("broker-state.log"));
        let mut before = PersistedState::default();
        before.apply(Change::SubscribeTask {
            identifier: "t".into(),
            client: "61".into(),
            limit: Some(2),
        });
        before.save(&snapshot).unwrap();
        let mut log = StateLog::open(&log_path).unwrap();
        let assign = |task: &str, delivery| Change::Assign {
            task: task.into(),
            client: "61".into(),
            delivery,
            at: 1.0,
            route: None,
        };
        log.record(&[assign("a", 5), assign("b", 6)]);
        log.record(&[Change::Release {
            task: "a".into(),
            acked: true,
        }]);
        drop(log);
        let mut text = std::fs::read(&log_path).unwrap();
        text.extend_from_slice(br#"{"change":"assign","task":"c","cli"#);
        std::fs::write(&log_path, text).unwrap();
        let state = PersistedState::restore(&snapshot, &log_path);
        assert_eq!(state.task_subscribers["t"], "61");
        assert_eq!(state.prefetch["61"], Some(2));
        assert_eq!(state.assignments.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(state.deliveries["b"].delivery, 6);
        assert_eq!(state.next_delivery, 7);
        assert_eq!(state.recently_acked, ["a"]);
        std::fs::remove_dir_all(dir).unwrap();
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
