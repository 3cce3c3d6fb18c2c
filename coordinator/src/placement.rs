//! Which workers run which queued job. Strict priority order: a job goes on `world_size` live,
//! idle, unclaimed workers that serve its model; a job that could run on the farm but whose
//! workers are busy holds those workers' pool, so lower-priority jobs cannot take them and a big
//! job is not starved by a stream of small ones; a job that cannot run on the farm as it is now
//! (no live worker serves its model, or fewer than its world size) is skipped with the reason.
//! Ranks are ordered so that workers on one `node` label are consecutive (tp groups, the
//! innermost degree, stay on a node), then by id. An owner with a rank quota runs at most that
//! many ranks at once: its next job waits, holding no workers, so the others' jobs go past it.

use std::collections::{BTreeMap, HashMap, HashSet};

use longtake_proto::{Worker, WorkerState};

/// The label that names the machine a worker runs on.
pub const NODE_LABEL: &str = "node";

/// A queued job, as placement sees it.
#[derive(Debug, Clone)]
pub struct Request {
    pub job_id: String,
    pub model: String,
    pub world_size: usize,
    /// Who submitted it (the owner its quota is counted against).
    pub owner: String,
}

/// How many ranks each owner may run at once: `default` for every owner not named in
/// `owners` (`None`: no limit).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankQuotas {
    pub default: Option<usize>,
    pub owners: BTreeMap<String, usize>,
}

impl RankQuotas {
    /// The most ranks `owner` may run at once (`None`: no limit).
    pub fn limit(&self, owner: &str) -> Option<usize> {
        self.owners.get(owner).copied().or(self.default)
    }

    /// For each owner with a quota among `owners`, the ranks it may still start, given the
    /// ranks it runs now (`in_use`).
    pub fn left<'a>(
        &self,
        owners: impl IntoIterator<Item = &'a str>,
        in_use: &HashMap<String, usize>,
    ) -> HashMap<String, usize> {
        owners
            .into_iter()
            .filter_map(|owner| {
                let limit = self.limit(owner)?;
                let used = in_use.get(owner).copied().unwrap_or(0);
                Some((owner.to_string(), limit.saturating_sub(used)))
            })
            .collect()
    }
}

/// What to do with one queued job this round.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run it on these workers, in rank order.
    Place(Vec<Worker>),
    /// It waits for busy workers (or behind a higher-priority job); the reason says which.
    Wait(String),
    /// It cannot run on the farm as it is now; the reason says why.
    Skip(String),
}

/// Decides every request, in the order given (the queue's). `claimed` are workers the
/// coordinator already uses, whatever their published state says; `ranks_left` the ranks each
/// owner with a quota may still start (an owner not in it has no limit).
pub fn plan(
    requests: &[Request],
    live: &[Worker],
    claimed: &HashSet<String>,
    ranks_left: &HashMap<String, usize>,
) -> Vec<(String, Decision)> {
    let mut ranks_left = ranks_left.clone();
    let mut taken: HashSet<String> = claimed.clone();
    // workers of higher-priority jobs that are waiting for them
    let mut held: HashSet<String> = HashSet::new();
    let mut decisions = Vec::with_capacity(requests.len());
    for req in requests {
        let serving: Vec<&Worker> = live
            .iter()
            .filter(|w| w.state != WorkerState::Draining as i32)
            .filter(|w| w.models.iter().any(|m| m.name == req.model))
            .collect();
        let over_quota = ranks_left
            .get(&req.owner)
            .filter(|&&left| left < req.world_size);
        let decision = if let Some(left) = over_quota {
            Decision::Wait(format!(
                "waiting: {} runs its quota of ranks ({} free of it, the job needs {})",
                req.owner, left, req.world_size
            ))
        } else if serving.is_empty() {
            Decision::Skip(format!(
                "waiting: no live worker serves model {}",
                req.model
            ))
        } else if serving.len() < req.world_size {
            Decision::Skip(format!(
                "waiting: needs {} workers, {} live",
                req.world_size,
                serving.len()
            ))
        } else {
            let free: Vec<&Worker> = serving
                .iter()
                .copied()
                .filter(|w| w.state == WorkerState::Idle as i32)
                .filter(|w| !taken.contains(&w.id) && !held.contains(&w.id))
                .collect();
            if free.len() >= req.world_size {
                let chosen = pick(&free, req.world_size);
                taken.extend(chosen.iter().map(|w| w.id.clone()));
                if let Some(left) = ranks_left.get_mut(&req.owner) {
                    *left -= req.world_size;
                }
                Decision::Place(chosen)
            } else {
                held.extend(serving.iter().map(|w| w.id.clone()));
                Decision::Wait(format!(
                    "waiting: needs {} free workers, {} free now",
                    req.world_size,
                    free.len()
                ))
            }
        };
        decisions.push((req.job_id.clone(), decision));
    }
    decisions
}

/// `n` of `free` in rank order: the fewest nodes possible (a node that fits the whole job, the
/// smallest such; else the biggest nodes first), workers of a node consecutive, then by id.
fn pick(free: &[&Worker], n: usize) -> Vec<Worker> {
    let mut nodes: BTreeMap<&str, Vec<&Worker>> = BTreeMap::new();
    for w in free {
        let node = w.labels.get(NODE_LABEL).map(String::as_str).unwrap_or("");
        nodes.entry(node).or_default().push(w);
    }
    for workers in nodes.values_mut() {
        workers.sort_by(|a, b| a.id.cmp(&b.id));
    }
    let fits = nodes
        .iter()
        .filter(|(node, ws)| !node.is_empty() && ws.len() >= n)
        .min_by_key(|(node, ws)| (ws.len(), **node));
    if let Some((_, ws)) = fits {
        return ws.iter().take(n).map(|w| (*w).clone()).collect();
    }
    let mut order: Vec<(&str, Vec<&Worker>)> = nodes.into_iter().collect();
    // unlabelled workers carry no locality; take them last
    order.sort_by_key(|(node, ws)| (node.is_empty(), std::cmp::Reverse(ws.len()), *node));
    order
        .into_iter()
        .flat_map(|(_, ws)| ws)
        .take(n)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use longtake_proto::ModelInfo;

    fn worker(id: &str, node: &str, state: WorkerState, models: &[&str]) -> Worker {
        Worker {
            id: id.into(),
            address: format!("{id}:1"),
            state: state as i32,
            labels: if node.is_empty() {
                Default::default()
            } else {
                [(NODE_LABEL.to_string(), node.to_string())].into()
            },
            models: models
                .iter()
                .map(|m| ModelInfo {
                    name: m.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn req(id: &str, model: &str, world: usize) -> Request {
        req_of("studio", id, model, world)
    }

    fn req_of(owner: &str, id: &str, model: &str, world: usize) -> Request {
        Request {
            job_id: id.into(),
            model: model.into(),
            world_size: world,
            owner: owner.into(),
        }
    }

    fn ids(d: &Decision) -> Vec<&str> {
        match d {
            Decision::Place(ws) => ws.iter().map(|w| w.id.as_str()).collect(),
            other => panic!("expected a placement, got {other:?}"),
        }
    }

    #[test]
    fn impossible_jobs_are_skipped_with_the_reason() {
        let live = vec![
            worker("w1", "", WorkerState::Idle, &["tiny"]),
            worker("w2", "", WorkerState::Busy, &["tiny"]),
        ];
        let d = plan(
            &[
                req("j-1", "wan-14b", 1),
                req("j-2", "tiny", 4),
                req("j-3", "tiny", 1),
            ],
            &live,
            &HashSet::new(),
            &HashMap::new(),
        );
        assert_eq!(
            d[0].1,
            Decision::Skip("waiting: no live worker serves model wan-14b".into())
        );
        assert_eq!(
            d[1].1,
            Decision::Skip("waiting: needs 4 workers, 2 live".into())
        );
        // skipped jobs do not block the ones behind them
        assert_eq!(ids(&d[2].1), ["w1"]);
    }

    #[test]
    fn a_job_waiting_for_busy_workers_blocks_lower_priority_ones() {
        let live = vec![
            worker("w1", "", WorkerState::Idle, &["tiny"]),
            worker("w2", "", WorkerState::Busy, &["tiny"]),
            worker("w3", "", WorkerState::Idle, &["other"]),
        ];
        let d = plan(
            &[
                req("j-big", "tiny", 2),
                req("j-small", "tiny", 1),
                req("j-other", "other", 1),
            ],
            &live,
            &HashSet::new(),
            &HashMap::new(),
        );
        assert_eq!(
            d[0].1,
            Decision::Wait("waiting: needs 2 free workers, 1 free now".into())
        );
        assert!(matches!(d[1].1, Decision::Wait(_)), "{:?}", d[1].1);
        // a disjoint pool still runs
        assert_eq!(ids(&d[2].1), ["w3"]);
    }

    #[test]
    fn claimed_and_draining_workers_are_not_used() {
        let live = vec![
            worker("w1", "", WorkerState::Idle, &["tiny"]),
            worker("w2", "", WorkerState::Idle, &["tiny"]),
            worker("w3", "", WorkerState::Draining, &["tiny"]),
        ];
        let claimed: HashSet<String> = ["w1".to_string()].into();
        let d = plan(
            &[req("j-1", "tiny", 1), req("j-2", "tiny", 1)],
            &live,
            &claimed,
            &HashMap::new(),
        );
        assert_eq!(ids(&d[0].1), ["w2"]);
        assert!(matches!(d[1].1, Decision::Wait(_)));
        let d = plan(
            &[req("j-3", "tiny", 3)],
            &live,
            &HashSet::new(),
            &HashMap::new(),
        );
        assert_eq!(
            d[0].1,
            Decision::Skip("waiting: needs 3 workers, 2 live".into())
        );
    }

    #[test]
    fn ranks_stay_on_one_node_when_they_fit() {
        let live = vec![
            worker("a1", "big", WorkerState::Idle, &["tiny"]),
            worker("a2", "big", WorkerState::Idle, &["tiny"]),
            worker("a3", "big", WorkerState::Idle, &["tiny"]),
            worker("b1", "small", WorkerState::Idle, &["tiny"]),
            worker("b2", "small", WorkerState::Idle, &["tiny"]),
            worker("c1", "", WorkerState::Idle, &["tiny"]),
        ];
        // the smallest node that fits
        let d = plan(
            &[req("j-1", "tiny", 2)],
            &live,
            &HashSet::new(),
            &HashMap::new(),
        );
        assert_eq!(ids(&d[0].1), ["b1", "b2"]);
        // no node fits: biggest node first, its workers consecutive, unlabelled last
        let d = plan(
            &[req("j-2", "tiny", 6)],
            &live,
            &HashSet::new(),
            &HashMap::new(),
        );
        assert_eq!(ids(&d[0].1), ["a1", "a2", "a3", "b1", "b2", "c1"]);
        // two jobs in one round do not share workers
        let d = plan(
            &[req("j-3", "tiny", 3), req("j-4", "tiny", 2)],
            &live,
            &HashSet::new(),
            &HashMap::new(),
        );
        assert_eq!(ids(&d[0].1), ["a1", "a2", "a3"]);
        assert_eq!(ids(&d[1].1), ["b1", "b2"]);
    }

    /// An owner at its quota waits without holding workers: another owner's lower-priority
    /// job runs on them; its own smaller job fits what is left of the quota.
    #[test]
    fn an_owner_runs_at_most_its_quota_of_ranks() {
        let live: Vec<Worker> = (1..=4)
            .map(|i| worker(&format!("w{i}"), "", WorkerState::Idle, &["tiny"]))
            .collect();
        let quotas = RankQuotas {
            default: Some(3),
            owners: [("ops".to_string(), 8)].into(),
        };
        assert_eq!((quotas.limit("a"), quotas.limit("ops")), (Some(3), Some(8)));
        // studio a already runs one rank elsewhere
        let in_use: HashMap<String, usize> = [("a".to_string(), 1)].into();
        let left = quotas.left(["a", "b"], &in_use);
        assert_eq!(left, [("a".to_string(), 2), ("b".to_string(), 3)].into());
        let d = plan(
            &[
                req_of("a", "j-1", "tiny", 3),
                req_of("b", "j-2", "tiny", 2),
                req_of("a", "j-3", "tiny", 2),
                req_of("a", "j-4", "tiny", 1),
            ],
            &live,
            &HashSet::new(),
            &left,
        );
        assert_eq!(
            d[0].1,
            Decision::Wait(
                "waiting: a runs its quota of ranks (2 free of it, the job needs 3)".into()
            )
        );
        assert_eq!(ids(&d[1].1), ["w1", "w2"], "the quota held workers");
        assert_eq!(ids(&d[2].1), ["w3", "w4"]);
        // a's quota is now spent
        assert!(
            matches!(&d[3].1, Decision::Wait(r) if r.contains("0 free of it")),
            "{:?}",
            d[3].1
        );
        assert!(RankQuotas::default().left(["a"], &in_use).is_empty());
    }
}
