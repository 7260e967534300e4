//! The RPC routes of kiwimq's broker, socket-free: who serves which identifier, and which
//! RPCs wait for an answer from whom. An answer counts only from the client the RPC went to,
//! and an RPC must carry an id of its own (one that no RPC waiting has).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::dispatch::ClientId;

/// The most RPCs waiting for an answer at once; more are refused with an error.
pub(crate) const MAX_PENDING_RPCS: usize = 100_000;

/// An RPC forwarded and not answered.
#[derive(Debug)]
struct Pending {
    caller: ClientId,
    recipient: ClientId,
    deadline: Instant,
}

/// The routes.
#[derive(Debug)]
pub(crate) struct RpcRouter {
    /// Identifier → the client that serves it.
    subscribers: HashMap<String, ClientId>,
    pending: HashMap<String, Pending>,
    timeout: Duration,
}

impl RpcRouter {
    /// Routes whose RPCs wait at most `timeout` for their answer.
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            subscribers: HashMap::new(),
            pending: HashMap::new(),
            timeout,
        }
    }

    /// How long an RPC waits for its answer.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `client` serves `identifier` (the latest subscriber wins, as on AiiDA's broker).
    pub(crate) fn subscribe(&mut self, identifier: String, client: ClientId) {
        self.subscribers.insert(identifier, client);
    }

    /// `client` no longer serves `identifier`; whether it did.
    pub(crate) fn unsubscribe(&mut self, identifier: &str, client: &ClientId) -> bool {
        if self.subscribers.get(identifier) == Some(client) {
            self.subscribers.remove(identifier);
            return true;
        }
        false
    }

    /// The subscriptions, identifier → client.
    pub(crate) fn subscriptions(&self) -> &HashMap<String, ClientId> {
        &self.subscribers
    }

    /// Whether `client` serves `identifier`.
    pub(crate) fn serves(&self, client: &ClientId, identifier: &str) -> bool {
        self.subscribers.get(identifier) == Some(client)
    }

    /// RPCs waiting for their answer.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Where an RPC `rpc_id` for `recipient` goes, or the error its caller gets.
    pub(crate) fn route(&self, rpc_id: &str, recipient: Option<&str>) -> Result<ClientId, String> {
        if rpc_id.is_empty() {
            return Err("Missing id: an rpc needs an id for its answer".to_owned());
        }
        let Some(recipient) = recipient else {
            return Err("Missing recipient".to_owned());
        };
        let Some(target) = self.subscribers.get(recipient) else {
            return Err(format!("Recipient not found: {recipient}"));
        };
        if self.pending.contains_key(rpc_id) {
            return Err(format!(
                "Duplicate id: an rpc {rpc_id} already waits for its answer"
            ));
        }
        if self.pending.len() >= MAX_PENDING_RPCS {
            return Err("the broker holds too many unanswered RPCs".to_owned());
        }
        Ok(target.clone())
    }

    /// An RPC was forwarded to `recipient`: its answer goes back to `caller`.
    pub(crate) fn forwarded(&mut self, rpc_id: String, caller: ClientId, recipient: ClientId) {
        let deadline = Instant::now() + self.timeout;
        self.pending.insert(
            rpc_id,
            Pending {
                caller,
                recipient,
                deadline,
            },
        );
    }

    /// `from` answers `rpc_id`: its caller, if `from` is the client it went to; else the
    /// answer is not taken (and the RPC waits on).
    pub(crate) fn answer(&mut self, from: &ClientId, rpc_id: &str) -> Result<ClientId, Unanswered> {
        match self.pending.get(rpc_id) {
            None => Err(Unanswered::NotWaiting),
            Some(pending) if pending.recipient != *from => Err(Unanswered::NotTheRecipient),
            Some(_) => Ok(self
                .pending
                .remove(rpc_id)
                .map(|p| p.caller)
                .unwrap_or_default()),
        }
    }

    /// The RPCs past their deadline, taken off: `(rpc_id, caller)`.
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<(String, ClientId)> {
        let ended: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(rpc_id, _)| rpc_id.clone())
            .collect();
        ended
            .into_iter()
            .filter_map(|rpc_id| {
                let pending = self.pending.remove(&rpc_id)?;
                Some((rpc_id, pending.caller))
            })
            .collect()
    }

    /// `client` is gone: its subscriptions go, and the RPCs waiting on it are taken off to
    /// be answered with an error: `(rpc_id, caller)`.
    pub(crate) fn remove_client(&mut self, client: &ClientId) -> Vec<(String, ClientId)> {
        self.subscribers.retain(|_, c| c != client);
        let orphaned: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.recipient == *client)
            .map(|(rpc_id, _)| rpc_id.clone())
            .collect();
        self.pending.retain(|_, p| p.caller != *client);
        orphaned
            .into_iter()
            .filter_map(|rpc_id| {
                let pending = self.pending.remove(&rpc_id)?;
                Some((rpc_id, pending.caller))
            })
            .collect()
    }
}

/// Why an answer was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unanswered {
    /// No RPC of that id waits (answered, expired, or never sent).
    NotWaiting,
    /// It came from a client the RPC did not go to.
    NotTheRecipient,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> ClientId {
        name.as_bytes().to_vec()
    }

    #[test]
    fn an_answer_counts_only_from_the_client_the_rpc_went_to() {
        let mut router = RpcRouter::new(Duration::from_secs(60));
        router.subscribe("42".into(), id("process-host"));
        let target = router.route("r1", Some("42")).unwrap();
        router.forwarded("r1".into(), id("caller"), target);
        assert_eq!(
            router.answer(&id("intruder"), "r1"),
            Err(Unanswered::NotTheRecipient)
        );
        assert_eq!(router.answer(&id("process-host"), "r1"), Ok(id("caller")));
        assert_eq!(
            router.answer(&id("process-host"), "r1"),
            Err(Unanswered::NotWaiting)
        );
    }

    #[test]
    fn an_rpc_without_an_id_or_with_one_that_waits_already_is_refused() {
        let mut router = RpcRouter::new(Duration::from_secs(60));
        router.subscribe("42".into(), id("host"));
        assert!(
            router
                .route("", Some("42"))
                .unwrap_err()
                .contains("Missing id")
        );
        router.forwarded("r1".into(), id("caller"), id("host"));
        assert!(
            router
                .route("r1", Some("42"))
                .unwrap_err()
                .contains("Duplicate id")
        );
        assert!(
            router
                .route("r2", Some("43"))
                .unwrap_err()
                .contains("not found")
        );
        assert!(
            router
                .route("r2", None)
                .unwrap_err()
                .contains("Missing recipient")
        );
    }

    #[test]
    fn rpcs_waiting_on_a_client_gone_are_answered_and_its_own_forgotten() {
        let mut router = RpcRouter::new(Duration::from_secs(60));
        router.subscribe("42".into(), id("host"));
        router.forwarded("to-host".into(), id("caller"), id("host"));
        router.forwarded("from-host".into(), id("host"), id("other"));
        assert_eq!(
            router.remove_client(&id("host")),
            [("to-host".to_owned(), id("caller"))]
        );
        assert_eq!(router.pending(), 0);
        assert!(router.subscriptions().is_empty());
    }

    #[test]
    fn an_rpc_past_its_deadline_expires() {
        let mut router = RpcRouter::new(Duration::ZERO);
        router.forwarded("r".into(), id("caller"), id("host"));
        assert_eq!(
            router.expired(Instant::now()),
            [("r".to_owned(), id("caller"))]
        );
        assert_eq!(router.pending(), 0);
    }
}
