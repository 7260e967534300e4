//! Who holds which task and who takes the next: kiwimq's broker's dispatcher, socket-free.
//!
//! It owns the task subscriptions, each client's prefetch and load, the round robin over
//! clients with room, and the assignments (task id → holder and delivery number). Its
//! invariants hold at every change, so nothing downstream assumes them:
//!
//! - a task is assigned to one holder at a time, and assigning a task already assigned is
//!   refused;
//! - a client's load is the number of tasks assigned to it;
//! - a settle counts only from the task's holder, and only for the delivery it names (a
//!   settle replayed from an earlier delivery of the same task is refused);
//! - a task taken back at start as a client's (from before a restart) is *restored*: the
//!   client may say it does not hold it (`kiwimq_holding`), and one handed over in the last
//!   moments before the stop — which may never have left the broker — is *leased*: it goes
//!   back to the queue unless its holder claims it within the lease.
//!
//! The broker (`broker.rs`) does the I/O: it asks the dispatcher whom to hand a task to,
//! then settles the store as the dispatcher's answers say.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

/// A client, by its ZeroMQ identity.
pub(crate) type ClientId = Vec<u8>;

/// One hand-over of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Assignment {
    pub(crate) holder: ClientId,
    /// Unique to this hand-over (never reused, across restarts too): a kiwimq client
    /// names it in its settle, so a settle of an earlier delivery of the task is told apart.
    pub(crate) delivery: u64,
    /// Taken back at start as the holder's and not yet claimed by it.
    pub(crate) restored: bool,
    /// For a restored task whose hand-over may not have reached its holder: when it goes
    /// back to the queue unless the holder claims it first.
    pub(crate) lease: Option<Instant>,
}

/// Why a settle did not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No one holds the task (settled already, or never handed out).
    NotHeld,
    /// Another client holds it.
    OtherHolder,
    /// The settle names an earlier delivery of the task than the one held now.
    StaleDelivery,
}

/// The dispatcher's state.
#[derive(Debug, Default)]
pub(crate) struct Dispatcher {
    /// Identifier → the client that subscribed it.
    task_subscribers: HashMap<String, ClientId>,
    /// Each task-subscribed client's limit (`None` unlimited).
    prefetch: HashMap<ClientId, Option<u32>>,
    /// Tasks assigned to each client.
    load: HashMap<ClientId, u32>,
    /// Clients that may have room, in round-robin order (checked again as they are taken).
    available: VecDeque<ClientId>,
    assignments: HashMap<String, Assignment>,
    next_delivery: u64,
}

impl Dispatcher {
    /// An empty dispatcher whose delivery numbers start above `floor`.
    pub(crate) fn new(floor: u64) -> Self {
        Self {
            next_delivery: floor.saturating_add(1),
            ..Self::default()
        }
    }

    /// The next delivery number that will be given (persisted, so a restart never reuses
    /// one).
    pub(crate) fn next_delivery(&self) -> u64 {
        self.next_delivery
    }

    /// `client` takes tasks under `identifier`, at most `limit` at once (`None` unlimited;
    /// the latest subscription of a client sets its limit, as AiiDA's broker does).
    pub(crate) fn subscribe(&mut self, identifier: String, client: &ClientId, limit: Option<u32>) {
        self.task_subscribers.insert(identifier, client.clone());
        self.prefetch.insert(client.clone(), limit);
        self.mark_available(client);
    }

    /// `client` no longer takes tasks under `identifier`; whether anything changed.
    pub(crate) fn unsubscribe(&mut self, identifier: &str, client: &ClientId) -> bool {
        let changed = self.task_subscribers.get(identifier) == Some(client);
        if changed {
            self.task_subscribers.remove(identifier);
        }
        if !self.subscribes(client) {
            self.prefetch.remove(client);
            self.available.retain(|c| c != client);
        }
        changed
    }

    /// Whether `client` holds a task subscription.
    pub(crate) fn subscribes(&self, client: &ClientId) -> bool {
        self.task_subscribers.values().any(|c| c == client)
    }

    /// The task subscriptions, identifier → client.
    pub(crate) fn subscriptions(&self) -> &HashMap<String, ClientId> {
        &self.task_subscribers
    }

    /// Each task-subscribed client's limit.
    pub(crate) fn limits(&self) -> &HashMap<ClientId, Option<u32>> {
        &self.prefetch
    }

    /// Every assignment, by task id.
    pub(crate) fn assignments(&self) -> &HashMap<String, Assignment> {
        &self.assignments
    }

    /// The assignment of `task_id`, if it is held.
    pub(crate) fn assignment(&self, task_id: &str) -> Option<&Assignment> {
        self.assignments.get(task_id)
    }

    /// Clients in the round robin now.
    pub(crate) fn available(&self) -> usize {
        self.available.len()
    }

    /// Tasks assigned to `client`.
    pub(crate) fn load(&self, client: &ClientId) -> u32 {
        self.load.get(client).copied().unwrap_or(0)
    }

    fn has_capacity(&self, client: &ClientId) -> bool {
        match self.prefetch.get(client).copied().flatten() {
            None => true,
            Some(limit) => self.load(client) < limit,
        }
    }

    /// Puts `client` in the round robin if it subscribes and has room.
    pub(crate) fn mark_available(&mut self, client: &ClientId) {
        if self.subscribes(client) && self.has_capacity(client) && !self.available.contains(client)
        {
            self.available.push_back(client.clone());
        }
    }

    /// The next client with room that `usable` allows (a reachable one), round robin; it
    /// stays in the round for the task after if it still has room once assigned.
    pub(crate) fn next_worker(&mut self, usable: impl Fn(&ClientId) -> bool) -> Option<ClientId> {
        for _ in 0..self.available.len() {
            let client = self.available.pop_front()?;
            if usable(&client) && self.subscribes(&client) && self.has_capacity(&client) {
                return Some(client);
            }
            // Unusable now: it comes back when it shows itself or a slot frees.
        }
        None
    }

    /// Gives back a client [`next_worker`](Self::next_worker) gave, when no task was there
    /// for it after all: it is first in the round again.
    pub(crate) fn put_back(&mut self, client: ClientId) {
        if !self.available.contains(&client) {
            self.available.push_front(client);
        }
    }

    /// Assigns `task_id` to `client` (from [`next_worker`](Self::next_worker)); the
    /// delivery number. Refused if the task is held already.
    pub(crate) fn assign(&mut self, task_id: &str, client: &ClientId) -> Option<u64> {
        if self.assignments.contains_key(task_id) {
            return None;
        }
        let delivery = self.next_delivery;
        // A state file's number can be the largest (a crash's garbage): no overflow.
        self.next_delivery = self.next_delivery.saturating_add(1);
        self.insert(
            task_id.to_owned(),
            Assignment {
                holder: client.clone(),
                delivery,
                restored: false,
                lease: None,
            },
        );
        self.mark_available(client);
        Some(delivery)
    }

    /// Takes back an assignment from before a restart; `false` if the task is held already
    /// (a state file a crash left with one id twice can name it once only).
    pub(crate) fn restore(&mut self, task_id: String, mut assignment: Assignment) -> bool {
        if self.assignments.contains_key(&task_id) {
            return false;
        }
        assignment.restored = true;
        self.next_delivery = self
            .next_delivery
            .max(assignment.delivery.saturating_add(1));
        self.insert(task_id, assignment);
        true
    }

    fn insert(&mut self, task_id: String, assignment: Assignment) {
        *self.load.entry(assignment.holder.clone()).or_default() += 1;
        self.assignments.insert(task_id, assignment);
    }

    /// `client` settles `task_id` (`delivery`: the hand-over it names, if its client says,
    /// as kiwimq's do; AiiDA's do not). On success the task is no one's: the caller acks or
    /// requeues it in the store.
    pub(crate) fn settle(
        &mut self,
        client: &ClientId,
        task_id: &str,
        delivery: Option<u64>,
    ) -> Result<(), Refusal> {
        let assignment = self.assignments.get(task_id).ok_or(Refusal::NotHeld)?;
        if assignment.holder != *client {
            return Err(Refusal::OtherHolder);
        }
        if delivery.is_some_and(|d| d != assignment.delivery) {
            return Err(Refusal::StaleDelivery);
        }
        self.release(task_id);
        Ok(())
    }

    /// Takes `task_id` from its holder, whoever asks (the broker for a holder gone, or a
    /// lease ended); whether it was held.
    pub(crate) fn release(&mut self, task_id: &str) -> bool {
        let Some(assignment) = self.assignments.remove(task_id) else {
            return false;
        };
        let holder = assignment.holder;
        if let Some(load) = self.load.get_mut(&holder) {
            *load = load.saturating_sub(1);
            if *load == 0 {
                self.load.remove(&holder);
            }
        }
        self.mark_available(&holder);
        true
    }

    /// `client` says it holds `holding`: each task restored as its own is claimed if listed,
    /// and released if not (it never reached the client). The tasks released.
    pub(crate) fn holding(&mut self, client: &ClientId, holding: &HashSet<String>) -> Vec<String> {
        let mut lost = Vec::new();
        for (task_id, assignment) in &mut self.assignments {
            if assignment.holder != *client || !assignment.restored {
                continue;
            }
            if holding.contains(task_id) {
                assignment.restored = false;
                assignment.lease = None;
            } else {
                lost.push(task_id.clone());
            }
        }
        for task_id in &lost {
            self.release(task_id);
        }
        lost
    }

    /// `client` shows it holds `task_id` (it acts on it): a restored task is its own again,
    /// leased no more. Whether it was restored.
    pub(crate) fn claim(&mut self, client: &ClientId, task_id: &str) -> bool {
        match self.assignments.get_mut(task_id) {
            Some(assignment) if assignment.holder == *client && assignment.restored => {
                assignment.restored = false;
                assignment.lease = None;
                true
            }
            _ => false,
        }
    }

    /// The leased tasks whose lease ended by `now`, released.
    pub(crate) fn expire_leases(&mut self, now: Instant) -> Vec<String> {
        let ended: Vec<String> = self
            .assignments
            .iter()
            .filter(|(_, a)| a.lease.is_some_and(|until| until <= now))
            .map(|(task_id, _)| task_id.clone())
            .collect();
        for task_id in &ended {
            self.release(task_id);
        }
        ended
    }

    /// Whether any lease is running.
    pub(crate) fn has_leases(&self) -> bool {
        self.assignments.values().any(|a| a.lease.is_some())
    }

    /// `client` is gone: its subscriptions and limit go, and its tasks are released; the
    /// tasks released.
    pub(crate) fn remove_client(&mut self, client: &ClientId) -> Vec<String> {
        let tasks: Vec<String> = self
            .assignments
            .iter()
            .filter(|(_, a)| a.holder == *client)
            .map(|(task_id, _)| task_id.clone())
            .collect();
        for task_id in &tasks {
            self.release(task_id);
        }
        self.task_subscribers.retain(|_, c| c != client);
        self.prefetch.remove(client);
        self.load.remove(client);
        self.available.retain(|c| c != client);
        tasks
    }

    /// Takes back a limit from before a restart.
    pub(crate) fn restore_limit(&mut self, client: ClientId, limit: Option<u32>) {
        self.prefetch.insert(client, limit);
    }

    /// Takes back a subscription from before a restart (its client joins the round robin
    /// when it shows itself).
    pub(crate) fn restore_subscription(&mut self, identifier: String, client: ClientId) {
        self.task_subscribers.insert(identifier, client);
    }

    /// Checks the invariants (for tests): loads match the assignments.
    #[cfg(test)]
    fn check(&self) {
        let mut counted: HashMap<&ClientId, u32> = HashMap::new();
        for assignment in self.assignments.values() {
            *counted.entry(&assignment.holder).or_default() += 1;
        }
        for (client, load) in &self.load {
            assert_eq!(
                counted.get(client).copied().unwrap_or(0),
                *load,
                "load of {client:?}"
            );
        }
        for (client, count) in counted {
            assert_eq!(self.load(client), count, "load of {client:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(name: &str) -> ClientId {
        name.as_bytes().to_vec()
    }

    /// Found writing the broker-state fuzz target: a delivery number of u64::MAX in
    /// broker-state.json (a crash's garbage) overflowed the next hand-over's number.
    #[test]
    fn a_restored_delivery_number_of_the_largest_does_not_overflow() {
        for (floor, restored) in [(u64::MAX, 1), (0, u64::MAX)] {
            let mut dispatcher = Dispatcher::new(floor);
            let worker = id("w");
            let assignment = Assignment {
                holder: worker.clone(),
                delivery: restored,
                restored: true,
                lease: None,
            };
            assert!(dispatcher.restore("old".into(), assignment));
            dispatcher.subscribe("tasks".into(), &worker, None);
            assert_eq!(dispatcher.assign("new", &worker), Some(u64::MAX));
        }
    }

    fn subscribed(limit: Option<u32>) -> (Dispatcher, ClientId) {
        let mut dispatcher = Dispatcher::new(0);
        let worker = id("w");
        dispatcher.subscribe("tasks".into(), &worker, limit);
        (dispatcher, worker)
    }

    #[test]
    fn a_task_held_already_is_not_assigned_again() {
        let (mut dispatcher, worker) = subscribed(None);
        let other = id("other");
        dispatcher.subscribe("t2".into(), &other, None);
        assert!(dispatcher.assign("a", &worker).is_some());
        assert_eq!(dispatcher.assign("a", &other), None);
        assert_eq!(dispatcher.assign("a", &worker), None);
        assert_eq!(dispatcher.load(&worker), 1);
        assert_eq!(dispatcher.load(&other), 0);
        dispatcher.check();
    }

    #[test]
    fn the_holders_settle_frees_its_slot_and_a_second_settle_is_refused() {
        let (mut dispatcher, worker) = subscribed(Some(1));
        let delivery = dispatcher.assign("a", &worker).unwrap();
        assert_eq!(
            dispatcher.next_worker(|_| true),
            None,
            "a prefetch-1 worker is full"
        );
        assert_eq!(
            dispatcher.settle(&id("intruder"), "a", None),
            Err(Refusal::OtherHolder)
        );
        assert_eq!(dispatcher.settle(&worker, "a", Some(delivery)), Ok(()));
        assert_eq!(
            dispatcher.settle(&worker, "a", Some(delivery)),
            Err(Refusal::NotHeld)
        );
        assert_eq!(dispatcher.next_worker(|_| true), Some(worker.clone()));
        dispatcher.check();
    }

    #[test]
    fn a_settle_of_an_earlier_delivery_does_not_settle_the_task_held_now() {
        let (mut dispatcher, worker) = subscribed(None);
        let first = dispatcher.assign("a", &worker).unwrap();
        dispatcher.settle(&worker, "a", Some(first)).unwrap();
        let second = dispatcher.assign("a", &worker).unwrap();
        assert_ne!(first, second);
        // The first delivery's requeue, sent again after a reconnect.
        assert_eq!(
            dispatcher.settle(&worker, "a", Some(first)),
            Err(Refusal::StaleDelivery)
        );
        assert_eq!(dispatcher.assignment("a").unwrap().delivery, second);
        assert_eq!(dispatcher.settle(&worker, "a", Some(second)), Ok(()));
        dispatcher.check();
    }

    #[test]
    fn delivery_numbers_are_never_reused_after_a_restore() {
        let mut dispatcher = Dispatcher::new(10);
        let worker = id("w");
        dispatcher.subscribe("tasks".into(), &worker, None);
        let restored = Assignment {
            holder: worker.clone(),
            delivery: 50,
            restored: false,
            lease: None,
        };
        assert!(dispatcher.restore("old".into(), restored.clone()));
        assert!(
            !dispatcher.restore("old".into(), restored),
            "one id, restored once"
        );
        assert!(dispatcher.assign("new", &worker).unwrap() > 50);
        assert_eq!(dispatcher.load(&worker), 2);
        dispatcher.check();
    }

    #[test]
    fn a_holding_list_claims_what_it_names_and_releases_the_rest() {
        let (mut dispatcher, worker) = subscribed(Some(3));
        for (n, task) in ["a", "b", "c"].into_iter().enumerate() {
            dispatcher.restore(
                task.into(),
                Assignment {
                    holder: worker.clone(),
                    delivery: n as u64 + 1,
                    restored: true,
                    lease: None,
                },
            );
        }
        dispatcher.assign("d", &worker).unwrap();
        let holding: HashSet<String> = ["a".to_owned()].into();
        let mut lost = dispatcher.holding(&worker, &holding);
        lost.sort();
        assert_eq!(lost, ["b", "c"]);
        assert!(!dispatcher.assignment("a").unwrap().restored);
        assert!(
            dispatcher.assignment("d").is_some(),
            "a task handed out since stays"
        );
        assert!(dispatcher.holding(&worker, &HashSet::new()).is_empty());
        dispatcher.check();
    }

    #[test]
    fn a_lease_not_claimed_in_time_releases_the_task() {
        let (mut dispatcher, worker) = subscribed(Some(1));
        let now = Instant::now();
        for task in ["leased", "claimed"] {
            dispatcher.restore(
                task.into(),
                Assignment {
                    holder: worker.clone(),
                    delivery: 1 + task.len() as u64,
                    restored: true,
                    lease: Some(now + Duration::from_secs(30)),
                },
            );
        }
        assert!(dispatcher.has_leases());
        assert!(dispatcher.claim(&worker, "claimed"));
        assert!(!dispatcher.claim(&id("other"), "leased"));
        assert!(dispatcher.expire_leases(now).is_empty());
        assert_eq!(
            dispatcher.expire_leases(now + Duration::from_secs(30)),
            ["leased"]
        );
        assert!(dispatcher.assignment("claimed").is_some());
        assert!(!dispatcher.has_leases());
        dispatcher.check();
    }

    #[test]
    fn a_removed_client_loses_its_tasks_and_subscriptions() {
        let (mut dispatcher, worker) = subscribed(None);
        dispatcher.assign("a", &worker).unwrap();
        dispatcher.assign("b", &worker).unwrap();
        let mut released = dispatcher.remove_client(&worker);
        released.sort();
        assert_eq!(released, ["a", "b"]);
        assert!(!dispatcher.subscribes(&worker));
        assert_eq!(dispatcher.next_worker(|_| true), None);
        dispatcher.check();
    }

    #[test]
    fn round_robin_skips_the_unusable_and_the_full() {
        let mut dispatcher = Dispatcher::new(0);
        let (a, b) = (id("a"), id("b"));
        dispatcher.subscribe("a".into(), &a, Some(1));
        dispatcher.subscribe("b".into(), &b, Some(2));
        let first = dispatcher.next_worker(|c| *c != a).unwrap();
        assert_eq!(first, b);
        dispatcher.assign("t1", &first).unwrap();
        assert_eq!(dispatcher.next_worker(|_| true), Some(b.clone()));
        dispatcher.assign("t2", &b).unwrap();
        // a was skipped while unusable: it comes back when it shows itself.
        assert_eq!(dispatcher.next_worker(|_| true), None);
        dispatcher.mark_available(&a);
        assert_eq!(dispatcher.next_worker(|_| true), Some(a));
        dispatcher.check();
    }
}
