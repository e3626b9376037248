//! The checkers that judge every simulated run.
//!
//! - **agreement**: no two correct replicas execute different batches at one sequence
//!   number;
//! - **linearizability**: the clients' key-value history has a sequential explanation
//!   that respects real time ([`linearizability`]);
//! - **state**: correct replicas report equal state (and application) digests for
//!   every checkpoint, whether they executed to it or installed it by state transfer;
//! - **liveness**: after GST every operation of a correct client completes within the
//!   stated bound;
//! - **blame**: no correct node is accused of a fault by a correct replica, and every
//!   frame a correct node sends decodes (a correct node that looks faulty to another
//!   one is a bug in one of them).

pub mod linearizability;

use crate::history::{Operation, Outcome};
use diffuse_core::crypto::Digest;
use diffuse_core::ids::{NodeId, ReplicaId, Seq};
use std::collections::BTreeMap;
use std::fmt;

/// The checkers, for counting violations per checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Checker {
    /// Same batch at the same sequence number.
    Agreement,
    /// Client history linearizable.
    Linearizability,
    /// Equal state digests at checkpoints.
    State,
    /// Requests complete after GST.
    Liveness,
    /// Correct nodes are never accused.
    Blame,
    /// The run itself exceeded its event budget (a message storm or a livelock).
    Budget,
    /// Some node panicked: untrusted input must never crash a replica.
    Panic,
}

impl Checker {
    /// All checkers, in table order.
    pub const ALL: [Checker; 7] = [
        Checker::Agreement,
        Checker::Linearizability,
        Checker::State,
        Checker::Liveness,
        Checker::Blame,
        Checker::Budget,
        Checker::Panic,
    ];

    /// The checker's name.
    pub fn name(self) -> &'static str {
        match self {
            Checker::Agreement => "agreement",
            Checker::Linearizability => "linearizability",
            Checker::State => "state",
            Checker::Liveness => "liveness",
            Checker::Blame => "blame",
            Checker::Budget => "budget",
            Checker::Panic => "panic",
        }
    }
}

/// One violation found in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The checker that found it.
    pub checker: Checker,
    /// What happened.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.checker.name(), self.detail)
    }
}

/// Safety checks that run while the simulation runs, on observations of correct
/// replicas.
#[derive(Debug, Default)]
pub struct OnlineChecks {
    executed: BTreeMap<Seq, (Digest, ReplicaId)>,
    checkpoints: BTreeMap<Seq, (Digest, Digest, ReplicaId)>,
    /// Violations found so far (capped; the first ones matter).
    pub violations: Vec<Violation>,
}

const MAX_VIOLATIONS: usize = 20;

impl OnlineChecks {
    fn report(&mut self, checker: Checker, detail: String) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(Violation { checker, detail });
        }
    }

    /// A correct replica executed `batch` at `seq`.
    pub fn executed(&mut self, replica: ReplicaId, seq: Seq, batch: Digest) {
        match self.executed.get(&seq) {
            Some((digest, first)) if *digest != batch => {
                let detail = format!(
                    "{first} executed batch {digest:?} at {seq} but {replica} executed {batch:?}"
                );
                self.report(Checker::Agreement, detail);
            }
            Some(_) => {}
            None => {
                self.executed.insert(seq, (batch, replica));
            }
        }
    }

    /// A correct replica reached checkpoint `seq` with these digests.
    pub fn checkpoint(&mut self, replica: ReplicaId, seq: Seq, state: Digest, app: Digest) {
        match self.checkpoints.get(&seq) {
            Some((s, a, first)) if *s != state || *a != app => {
                let detail = format!(
                    "at checkpoint {seq}: {first} has state {s:?} (app {a:?}) but {replica} has {state:?} (app {app:?})"
                );
                self.report(Checker::State, detail);
            }
            Some(_) => {}
            None => {
                self.checkpoints.insert(seq, (state, app, replica));
            }
        }
    }

    /// A correct replica accused `culprit`, which the simulator knows to be correct.
    pub fn false_accusation(&mut self, accuser: ReplicaId, culprit: NodeId, kind: &str) {
        self.report(
            Checker::Blame,
            format!("{accuser} accused correct {culprit} of {kind}"),
        );
    }

    /// A frame sent by a correct node did not decode.
    pub fn undecodable(&mut self, from: NodeId, to: NodeId, error: &str) {
        self.report(
            Checker::Blame,
            format!("frame from correct {from} to {to} did not decode: {error}"),
        );
    }

    /// The run exceeded its event budget.
    pub fn budget_exhausted(&mut self, events: u64) {
        self.report(Checker::Budget, format!("run exceeded {events} events"));
    }

    /// Runs the end-of-run checks (linearizability and liveness) and returns all
    /// violations.
    pub fn finish(
        mut self,
        history: &[Operation],
        gst_ns: u64,
        end_ns: u64,
        bound_ns: u64,
    ) -> Vec<Violation> {
        if let Err(violation) = linearizability::check(history) {
            self.report(Checker::Linearizability, violation.to_string());
        }
        for op in history {
            let start = op.invoke_ns.max(gst_ns);
            let late = match op.outcome {
                Outcome::Completed { at_ns, .. } => at_ns > start + bound_ns,
                Outcome::Pending => end_ns >= start + bound_ns,
            };
            if late {
                let state = match op.outcome {
                    Outcome::Completed { at_ns, .. } => {
                        format!("completed at {:.3} s", at_ns as f64 / 1e9)
                    }
                    Outcome::Pending => "never completed".to_string(),
                };
                let detail = format!(
                    "{} invoked {:?} at {:.3} s (GST {:.3} s) and {state}; bound {:.1} s",
                    op.client,
                    op.op,
                    op.invoke_ns as f64 / 1e9,
                    gst_ns as f64 / 1e9,
                    bound_ns as f64 / 1e9
                );
                self.report(Checker::Liveness, detail);
                break;
            }
        }
        self.violations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_flags_two_digests_at_one_sequence_number() {
        let mut c = OnlineChecks::default();
        c.executed(ReplicaId(0), Seq(1), Digest([1; 32]));
        c.executed(ReplicaId(1), Seq(1), Digest([1; 32]));
        assert!(c.violations.is_empty());
        c.executed(ReplicaId(2), Seq(1), Digest([2; 32]));
        assert_eq!(c.violations[0].checker, Checker::Agreement);
    }

    #[test]
    fn state_flags_diverging_checkpoints() {
        let mut c = OnlineChecks::default();
        c.checkpoint(ReplicaId(0), Seq(4), Digest([1; 32]), Digest([5; 32]));
        c.checkpoint(ReplicaId(1), Seq(4), Digest([1; 32]), Digest([6; 32]));
        assert_eq!(c.violations[0].checker, Checker::State);
    }

    #[test]
    fn liveness_flags_pending_operations_past_the_bound() {
        use diffuse_apps::KvOp;
        use diffuse_core::ids::ClientId;
        let op = Operation {
            client: ClientId(1),
            op: KvOp::get(b"k"),
            invoke_ns: 10,
            outcome: Outcome::Pending,
        };
        let ok = OnlineChecks::default().finish(std::slice::from_ref(&op), 100, 150, 100);
        assert!(ok.is_empty());
        let late = OnlineChecks::default().finish(&[op], 100, 250, 100);
        assert_eq!(late[0].checker, Checker::Liveness);
    }
}
