//! STATUS: how a replica that stopped making progress gets what it missed.
//!
//! PBFT's messages are sent once; a message lost before the network stabilises is
//! never sent again by the normal case. As in Castro and Liskov's library, a replica
//! that is not making progress periodically tells its peers where it is, and each
//! peer resends what that replica lacks: the NEW-VIEW of a view it missed, its own
//! VIEW-CHANGE, a stable-checkpoint certificate to transfer state from, or its own
//! PRE-PREPARE / PREPARE / COMMIT messages for the sequence numbers above the
//! replica's last executed one. Answers are rate-limited per peer per interval, so a
//! Byzantine peer cannot turn STATUS into an amplifier.

use super::{Out, PbftReplica, Timer};
use crate::message::{Commit, Message, PrePrepare, Status};
use diffuse_core::ids::{ReplicaId, Seq, View};
use std::collections::BTreeMap;

/// The most sequence numbers resent in answer to one STATUS.
const MAX_RESENT_SLOTS: u64 = 64;
/// The most expensive answers (state chunks, batches) per peer per interval.
const EXPENSIVE_PER_INTERVAL: u32 = 64;

/// Progress tracking and rate limits.
#[derive(Debug, Default)]
pub(crate) struct StatusState {
    /// Status intervals elapsed.
    ticks: u64,
    /// `last_executed` at the previous tick.
    executed_at_tick: Seq,
    /// Whether the next tick must send STATUS (just restarted).
    pub recovering: bool,
    /// The tick in which each peer's STATUS was last answered.
    answered: BTreeMap<ReplicaId, u64>,
    /// Expensive answers given to each peer in the current tick.
    expensive: BTreeMap<ReplicaId, u32>,
}

impl StatusState {
    /// Whether `peer` may receive one more expensive answer in this interval.
    pub fn allow_expensive(&mut self, peer: ReplicaId) -> bool {
        let used = self.expensive.entry(peer).or_default();
        *used += 1;
        *used <= EXPENSIVE_PER_INTERVAL
    }
}

impl PbftReplica {
    /// Starts the periodic status check.
    pub(super) fn start_status_timer(&mut self, out: &mut Out) {
        out.set_timer(Timer::Status, self.options.status_interval);
    }

    pub(super) fn on_status_tick(&mut self, out: &mut Out) {
        self.status.ticks += 1;
        self.status.expensive.clear();
        let stalled = self.last_executed == self.status.executed_at_tick && self.has_work();
        if stalled || self.status.recovering {
            self.broadcast_status(out);
        }
        self.status.recovering = false;
        self.status.executed_at_tick = self.last_executed;
        self.start_status_timer(out);
    }

    /// Tells every peer where this replica is (and, while changing view, repeats its
    /// VIEW-CHANGE, which may have been lost).
    pub(super) fn broadcast_status(&self, out: &mut Out) {
        out.broadcast(Message::Status(Status {
            view: self.view,
            view_active: self.view_active,
            last_executed: self.last_executed,
            stable: self.low(),
        }));
        if let Some(vc) = &self.view_change.own {
            out.broadcast(Message::ViewChange(vc.clone()));
        }
    }

    /// Whether the replica is waiting for something it may have missed.
    fn has_work(&self) -> bool {
        !self.view_active
            || self.needs_state
            || !self.pending.is_empty()
            || self.log.range(self.last_executed.next()..).next().is_some()
    }

    pub(super) fn on_status(&mut self, from: ReplicaId, status: Status, out: &mut Out) {
        if from == self.id || self.status.answered.get(&from) == Some(&self.status.ticks) {
            return;
        }
        self.status.answered.insert(from, self.status.ticks);
        if self.view_active {
            let behind =
                status.view < self.view || (status.view == self.view && !status.view_active);
            if behind {
                if let Some(new_view) = &self.current_new_view {
                    out.send(from, Message::NewView((**new_view).clone()));
                }
            }
        } else if status.view <= self.view {
            if let Some(vc) = &self.view_change.own {
                out.send(from, Message::ViewChange(vc.clone()));
            }
        }
        if status.stable < self.low() && status.last_executed < self.low() {
            out.send(from, Message::CheckpointCert(self.stable.clone()));
        }
        if self.view_active && status.view == self.view && status.view_active {
            self.resend_slots(from, status.last_executed, out);
        } else if status.view_active && status.view < self.view {
            self.resend_prepared(from, status.view, status.last_executed, out);
        }
    }

    /// The sequence numbers to resend to a replica that executed up to `their_executed`.
    fn resend_range(&self, their_executed: Seq) -> Option<std::ops::RangeInclusive<Seq>> {
        let from = their_executed.max(self.low()).next();
        let to = from.plus(MAX_RESENT_SLOTS - 1).min(self.high());
        (from <= to).then_some(from..=to)
    }

    /// For a replica still active in an older `view`: the votes this replica cast in
    /// that view, rebuilt from its prepared certificates of that view. They are
    /// retransmissions of messages already sent before this replica left the view
    /// (and its VIEW-CHANGE carried the same certificates), so they change nothing
    /// for safety; without them a replica left behind in the old view, missing only
    /// these commits, could wait forever for a view change nobody else needs.
    fn resend_prepared(&self, to: ReplicaId, view: View, their_executed: Seq, out: &mut Out) {
        let Some(range) = self.resend_range(their_executed) else {
            return;
        };
        for (seq, slot) in self.log.range(range) {
            let Some(cert) = &slot.prepared else { continue };
            if cert.proposal.view != view {
                continue;
            }
            let digest = cert.proposal.digest;
            if let Some(batch) = slot.body(&digest) {
                out.send(
                    to,
                    Message::PrePrepare(PrePrepare {
                        proposal: cert.proposal.clone(),
                        batch: (*batch).clone(),
                    }),
                );
            }
            if let Some(prepare) = cert.prepares.iter().find(|p| p.replica == self.id) {
                out.send(to, Message::Prepare(prepare.clone()));
            }
            out.send(
                to,
                Message::Commit(Commit {
                    view,
                    seq: *seq,
                    digest,
                    replica: self.id,
                }),
            );
        }
    }

    /// Resends this replica's own normal-case messages (and relays the signed
    /// PRE-PREPARE) for the slots above `their_executed`.
    fn resend_slots(&self, to: ReplicaId, their_executed: Seq, out: &mut Out) {
        let Some(range) = self.resend_range(their_executed) else {
            return;
        };
        for (seq, slot) in self.log.range(range) {
            if let Some(proposal) = &slot.proposal {
                if let Some(batch) = slot.body(&proposal.digest) {
                    out.send(
                        to,
                        Message::PrePrepare(PrePrepare {
                            proposal: proposal.clone(),
                            batch: (*batch).clone(),
                        }),
                    );
                }
            }
            if let Some(prepare) = slot.prepares.get(&self.id) {
                out.send(to, Message::Prepare(prepare.clone()));
            }
            if let Some(digest) = slot.commits.get(&self.id) {
                out.send(
                    to,
                    Message::Commit(Commit {
                        view: self.view,
                        seq: *seq,
                        digest: *digest,
                        replica: self.id,
                    }),
                );
            }
        }
    }
}
