//! In-process membership for the embedded farm: the records live in a map behind a lock, and
//! subscribers get every change through a channel. A registration that is dropped leaves at once
//! (there is no process to outlive it).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{Membership, MembershipError, MembershipEvent, Registration, Result, Subscription};
use crate::v1::Worker;

/// How many changes a slow subscriber may lag behind before it is dropped (it resubscribes).
const SUBSCRIBER_BUFFER: usize = 1024;

#[derive(Default)]
struct State {
    workers: BTreeMap<String, Worker>,
    subscribers: Vec<mpsc::Sender<MembershipEvent>>,
}

impl State {
    fn publish(&mut self, event: MembershipEvent) {
        self.subscribers
            .retain(|tx| tx.try_send(event.clone()).is_ok());
    }
}

/// Membership held in this process. Clones share the same records.
#[derive(Clone, Default)]
pub struct InProcessMembership {
    state: Arc<Mutex<State>>,
}

impl InProcessMembership {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait::async_trait]
impl Membership for InProcessMembership {
    async fn register(&self, worker: Worker) -> Result<Box<dyn Registration>> {
        let mut state = self.lock();
        if state.workers.contains_key(&worker.id) {
            return Err(MembershipError::DuplicateId(worker.id));
        }
        let id = worker.id.clone();
        state.workers.insert(id.clone(), worker.clone());
        state.publish(MembershipEvent::Put(worker));
        Ok(Box::new(InProcessRegistration {
            membership: self.clone(),
            id,
            left: Mutex::new(false),
        }))
    }

    async fn list(&self) -> Result<Vec<Worker>> {
        Ok(self.lock().workers.values().cloned().collect())
    }

    async fn subscribe(&self) -> Result<Subscription> {
        let mut state = self.lock();
        let (tx, events) = mpsc::channel(SUBSCRIBER_BUFFER);
        state.subscribers.push(tx);
        Ok(Subscription {
            workers: state.workers.values().cloned().collect(),
            events,
        })
    }
}

struct InProcessRegistration {
    membership: InProcessMembership,
    id: String,
    left: Mutex<bool>,
}

impl InProcessRegistration {
    fn remove(&self) {
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        if !*left {
            *left = true;
            let mut state = self.membership.lock();
            state.workers.remove(&self.id);
            state.publish(MembershipEvent::Left(self.id.clone()));
        }
    }
}

#[async_trait::async_trait]
impl Registration for InProcessRegistration {
    async fn update(&self, worker: Worker) -> Result<()> {
        if *self.left.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(MembershipError::Ended(self.id.clone()));
        }
        let mut state = self.membership.lock();
        let worker = Worker {
            id: self.id.clone(),
            ..worker
        };
        state.workers.insert(self.id.clone(), worker.clone());
        state.publish(MembershipEvent::Put(worker));
        Ok(())
    }

    async fn leave(self: Box<Self>) -> Result<()> {
        self.remove();
        Ok(())
    }
}

impl Drop for InProcessRegistration {
    fn drop(&mut self) {
        self.remove();
    }
}
