//! The queue of waiting jobs: higher priority first, first submitted first within a priority
//! (`submitted_at_ms`, then id), and each job's position in it for the `Queued` event.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

/// Where a job sorts: priority descending, then submission time, then id.
type Key = (Reverse<i32>, u64, String);

#[derive(Debug, Default)]
pub struct JobQueue {
    order: BTreeSet<Key>,
    keys: HashMap<String, Key>,
}

impl JobQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a job (or moves it, if it is already queued with other values).
    pub fn push(&mut self, id: &str, priority: i32, submitted_at_ms: u64) {
        self.remove(id);
        let key = (Reverse(priority), submitted_at_ms, id.to_string());
        self.order.insert(key.clone());
        self.keys.insert(id.to_string(), key);
    }

    /// Takes a job out; whether it was queued.
    pub fn remove(&mut self, id: &str) -> bool {
        match self.keys.remove(id) {
            Some(key) => self.order.remove(&key),
            None => false,
        }
    }

    /// Job ids in the order they run.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(|(_, _, id)| id.as_str())
    }

    /// Jobs ahead of `id`, or `None` if it is not queued.
    pub fn position(&self, id: &str) -> Option<u32> {
        let key = self.keys.get(id)?;
        Some(self.order.range(..key).count() as u32)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_priority_first_then_fifo() {
        let mut q = JobQueue::new();
        q.push("j-c", 0, 30);
        q.push("j-a", 0, 10);
        q.push("j-hi", 5, 40);
        q.push("j-b2", 0, 20);
        q.push("j-b1", 0, 20);
        q.push("j-low", -1, 1);
        let order: Vec<&str> = q.iter().collect();
        assert_eq!(order, ["j-hi", "j-a", "j-b1", "j-b2", "j-c", "j-low"]);
        assert_eq!(q.position("j-hi"), Some(0));
        assert_eq!(q.position("j-b2"), Some(3));
        assert_eq!(q.position("j-low"), Some(5));
        assert_eq!(q.position("nope"), None);
    }

    #[test]
    fn remove_and_requeue_keep_the_order_consistent() {
        let mut q = JobQueue::new();
        q.push("j-1", 0, 1);
        q.push("j-2", 0, 2);
        q.push("j-3", 0, 3);
        assert!(q.remove("j-1"));
        assert!(!q.remove("j-1"));
        assert_eq!(q.position("j-3"), Some(1));
        // a re-queued job keeps its submission time, so it goes back ahead of later ones
        q.push("j-1", 0, 1);
        assert_eq!(q.iter().collect::<Vec<_>>(), ["j-1", "j-2", "j-3"]);
        q.push("j-3", 1, 3);
        assert_eq!(q.iter().collect::<Vec<_>>(), ["j-3", "j-1", "j-2"]);
        assert_eq!(q.len(), 3);
    }
}
