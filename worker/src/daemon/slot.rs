//! The worker's one task slot, as a state machine without I/O: idle, reserved for a rank of a
//! job (holding that rank's mesh listener), or running it; and whether the worker drains. The
//! daemon applies requests to it and publishes the record it implies.

use longtake_proto::WorkerState;

use super::task::Abort;

/// Which rank of which job attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub job_id: String,
    pub attempt: u32,
    pub rank: u32,
    pub world_size: u32,
}

#[derive(Debug)]
pub struct Reservation {
    pub assignment: Assignment,
    /// The mesh listener of a job with more than one rank, and the address handed out for it.
    pub mesh: Option<std::net::TcpListener>,
    pub mesh_address: String,
    /// Tells this reservation from a later one of the same job (for its time-out).
    pub serial: u64,
}

#[derive(Debug)]
pub enum Phase {
    Idle,
    Reserved(Reservation),
    Running {
        assignment: Assignment,
        abort: Abort,
    },
}

/// A request the slot's state does not allow.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("worker {id} is draining (shutting down) and takes no new task")]
    Draining { id: String },
    #[error("worker {id} is busy with job {job_id}")]
    Busy { id: String, job_id: String },
    #[error("worker {id} holds no reservation for job {job_id} attempt {attempt} rank {rank} ({state}); Reserve it first")]
    NotReserved {
        id: String,
        job_id: String,
        attempt: u32,
        rank: u32,
        state: String,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("worker {id}: cannot open a mesh listener on {host}: {source}")]
    Bind {
        id: String,
        host: String,
        source: std::io::Error,
    },
}

/// What a granted reservation hands back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub mesh_address: String,
    pub serial: u64,
}

/// What [`Slot::abort`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aborted {
    NotFound,
    /// A reservation was dropped; the worker is idle.
    Released,
    /// The running task was told to stop; the worker is idle when it has.
    Stopping,
}

#[derive(Debug)]
pub struct Slot {
    id: String,
    phase: Phase,
    draining: bool,
    next_serial: u64,
}

impl Slot {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            phase: Phase::Idle,
            draining: false,
            next_serial: 0,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn is_running(&self) -> bool {
        matches!(self.phase, Phase::Running { .. })
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The record's state and job.
    pub fn state(&self) -> (WorkerState, String) {
        let job = match &self.phase {
            Phase::Idle => String::new(),
            Phase::Reserved(r) => r.assignment.job_id.clone(),
            Phase::Running { assignment, .. } => assignment.job_id.clone(),
        };
        let state = match (&self.phase, self.draining) {
            (_, true) => WorkerState::Draining,
            (Phase::Idle, false) => WorkerState::Idle,
            (_, false) => WorkerState::Busy,
        };
        (state, job)
    }

    /// Commits an idle worker to `assignment`; `bind` opens the mesh listener of a job with more
    /// than one rank (returning it and its address). The same reservation asked again (a
    /// retried request) gets the same answer.
    pub fn reserve(
        &mut self,
        assignment: Assignment,
        bind: impl FnOnce() -> Result<(std::net::TcpListener, String), SlotError>,
    ) -> Result<Granted, SlotError> {
        if assignment.job_id.is_empty() {
            return Err(SlotError::InvalidArgument(
                "job_id: must not be empty".into(),
            ));
        }
        if assignment.world_size == 0 || assignment.rank >= assignment.world_size {
            return Err(SlotError::InvalidArgument(format!(
                "rank: {} is not a rank of a job of world_size {}",
                assignment.rank, assignment.world_size
            )));
        }
        if self.draining {
            return Err(SlotError::Draining {
                id: self.id.clone(),
            });
        }
        match &self.phase {
            Phase::Idle => {}
            Phase::Reserved(r) if r.assignment == assignment => {
                return Ok(Granted {
                    mesh_address: r.mesh_address.clone(),
                    serial: r.serial,
                })
            }
            _ => {
                return Err(SlotError::Busy {
                    id: self.id.clone(),
                    job_id: self.state().1,
                })
            }
        }
        let (mesh, mesh_address) = if assignment.world_size > 1 {
            let (listener, address) = bind()?;
            (Some(listener), address)
        } else {
            (None, String::new())
        };
        self.next_serial += 1;
        let serial = self.next_serial;
        self.phase = Phase::Reserved(Reservation {
            assignment,
            mesh,
            mesh_address: mesh_address.clone(),
            serial,
        });
        Ok(Granted {
            mesh_address,
            serial,
        })
    }

    /// Turns the matching reservation into a running task; returns its mesh listener and the
    /// handle that aborts it.
    pub fn start(
        &mut self,
        job_id: &str,
        attempt: u32,
        rank: u32,
    ) -> Result<(Assignment, Option<std::net::TcpListener>, Abort), SlotError> {
        let matches = matches!(&self.phase, Phase::Reserved(r)
            if r.assignment.job_id == job_id && r.assignment.attempt == attempt && r.assignment.rank == rank);
        if !matches {
            let state = match &self.phase {
                Phase::Idle => "it is idle".to_string(),
                Phase::Reserved(r) => format!(
                    "it is reserved for job {} attempt {} rank {}",
                    r.assignment.job_id, r.assignment.attempt, r.assignment.rank
                ),
                Phase::Running { assignment, .. } => {
                    format!("it is running job {}", assignment.job_id)
                }
            };
            return Err(SlotError::NotReserved {
                id: self.id.clone(),
                job_id: job_id.to_string(),
                attempt,
                rank,
                state,
            });
        }
        let Phase::Reserved(reservation) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            unreachable!("checked above");
        };
        let abort = Abort::default();
        self.phase = Phase::Running {
            assignment: reservation.assignment.clone(),
            abort: abort.clone(),
        };
        Ok((reservation.assignment, reservation.mesh, abort))
    }

    /// The running task has ended: idle again (or still draining).
    pub fn finish(&mut self) {
        if self.is_running() {
            self.phase = Phase::Idle;
        }
    }

    /// Drops reservation `serial` if it is still waiting for its task; whether it was.
    pub fn expire(&mut self, serial: u64) -> bool {
        if matches!(&self.phase, Phase::Reserved(r) if r.serial == serial) {
            self.phase = Phase::Idle;
            return true;
        }
        false
    }

    /// Releases the reservation for `job_id` or stops its running task.
    pub fn abort(&mut self, job_id: &str, reason: &str) -> Aborted {
        match &self.phase {
            Phase::Reserved(r) if r.assignment.job_id == job_id => {
                self.phase = Phase::Idle;
                Aborted::Released
            }
            Phase::Running { assignment, abort } if assignment.job_id == job_id => {
                abort.abort(reason);
                Aborted::Stopping
            }
            _ => Aborted::NotFound,
        }
    }

    /// Takes no new reservation from now on and drops a waiting one; whether one was dropped.
    pub fn drain(&mut self) -> bool {
        self.draining = true;
        if matches!(self.phase, Phase::Reserved(_)) {
            self.phase = Phase::Idle;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, rank: u32, world_size: u32) -> Assignment {
        Assignment {
            job_id: id.into(),
            attempt: 1,
            rank,
            world_size,
        }
    }

    fn no_bind() -> Result<(std::net::TcpListener, String), SlotError> {
        panic!("a one-rank job binds no mesh listener")
    }

    #[test]
    fn reserve_start_finish() {
        let mut slot = Slot::new("w1");
        assert_eq!(slot.state(), (WorkerState::Idle, String::new()));
        let granted = slot.reserve(job("j1", 0, 1), no_bind).unwrap();
        assert_eq!(granted.mesh_address, "");
        assert_eq!(slot.state(), (WorkerState::Busy, "j1".into()));
        // A retried Reserve gets the same answer; another job is refused naming the first.
        assert_eq!(slot.reserve(job("j1", 0, 1), no_bind).unwrap(), granted);
        let busy = slot.reserve(job("j2", 0, 1), no_bind).unwrap_err();
        assert_eq!(busy.to_string(), "worker w1 is busy with job j1");
        let wrong = slot.start("j1", 1, 1).unwrap_err().to_string();
        assert!(
            wrong.contains("it is reserved for job j1 attempt 1 rank 0"),
            "{wrong}"
        );
        let (assignment, mesh, abort) = slot.start("j1", 1, 0).unwrap();
        assert_eq!(assignment, job("j1", 0, 1));
        assert!(mesh.is_none() && !abort.is_aborted());
        assert!(slot.is_running());
        assert!(matches!(
            slot.reserve(job("j2", 0, 1), no_bind),
            Err(SlotError::Busy { .. })
        ));
        slot.finish();
        assert_eq!(slot.state(), (WorkerState::Idle, String::new()));
        assert!(slot
            .start("j1", 1, 0)
            .unwrap_err()
            .to_string()
            .contains("it is idle"));
    }

    #[test]
    fn a_multi_rank_reservation_holds_its_listener() {
        let mut slot = Slot::new("w1");
        let granted = slot
            .reserve(job("j1", 1, 2), || {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = l.local_addr().unwrap().to_string();
                Ok((l, addr))
            })
            .unwrap();
        assert!(granted.mesh_address.starts_with("127.0.0.1:"));
        let (_, mesh, _) = slot.start("j1", 1, 1).unwrap();
        let mesh = mesh.unwrap();
        assert_eq!(mesh.local_addr().unwrap().to_string(), granted.mesh_address);
    }

    #[test]
    fn bad_reservations_are_invalid_arguments() {
        let mut slot = Slot::new("w1");
        for bad in [job("", 0, 1), job("j", 0, 0), job("j", 2, 2)] {
            assert!(matches!(
                slot.reserve(bad, no_bind),
                Err(SlotError::InvalidArgument(_))
            ));
        }
        assert_eq!(slot.state().0, WorkerState::Idle);
    }

    #[test]
    fn expiry_and_abort_release_only_their_own() {
        let mut slot = Slot::new("w1");
        let first = slot.reserve(job("j1", 0, 1), no_bind).unwrap();
        assert!(slot.expire(first.serial));
        let second = slot.reserve(job("j1", 0, 1), no_bind).unwrap();
        assert!(
            !slot.expire(first.serial),
            "an old timer must not free a new reservation"
        );
        assert_eq!(slot.abort("j2", "x"), Aborted::NotFound);
        assert_eq!(slot.abort("j1", "x"), Aborted::Released);
        assert!(!slot.expire(second.serial));
        slot.reserve(job("j1", 0, 1), no_bind).unwrap();
        let (_, _, abort) = slot.start("j1", 1, 0).unwrap();
        assert_eq!(slot.abort("j1", "user asked"), Aborted::Stopping);
        assert!(abort.is_aborted());
        assert_eq!(abort.reason(), "user asked");
        assert!(slot.is_running(), "running until the task has stopped");
    }

    #[test]
    fn draining_refuses_and_drops_a_waiting_reservation() {
        let mut slot = Slot::new("w1");
        slot.reserve(job("j1", 0, 1), no_bind).unwrap();
        assert!(slot.drain());
        assert_eq!(slot.state(), (WorkerState::Draining, String::new()));
        let err = slot.reserve(job("j2", 0, 1), no_bind).unwrap_err();
        assert_eq!(
            err.to_string(),
            "worker w1 is draining (shutting down) and takes no new task"
        );
    }
}
