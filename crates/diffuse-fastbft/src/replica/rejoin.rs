//! Coming back after a restart (FastBFT §6.1, as `docs/protocols/fastbft.md`,
//! "Restarts and REJOIN", builds it).
//!
//! A replica keeps no durable log, so after any restart its enclave is out of the
//! view it was in ([`diffuse_tee::FastBftComponent`]'s sealed state says which,
//! `docs/tee.md`) and it takes part again from the next view it enters by its
//! NEW-VIEW, catching up by state transfer. After an unscheduled reboot the
//! enclave is locked first: it asks every peer (REJOIN) for a report signed by the
//! peer's enclave over its fresh challenge, and `f + 1` of them unlock it out of
//! the highest view any of them knows, which bounds every view it was in.

use super::{FastBftReplica, Out, Timer};
use crate::message::Message;
use diffuse_core::crypto::{Digest, Signed};
use diffuse_core::ids::ReplicaId;
use diffuse_tee::{CounterReport, FastBftComponent, TrustedComponent, view_of_epoch};
use std::collections::{BTreeMap, BTreeSet};

/// REJOIN state.
#[derive(Debug, Default)]
pub(crate) struct RejoinState {
    /// Locked: asking for reports.
    pub(crate) locked: bool,
    /// The log of the view the enclave is out of was lost in the restart: no
    /// VIEW-CHANGE can be sent until a view is entered.
    pub(crate) log_lost: bool,
    /// A restarted primary asking to be replaced, until a view is entered.
    pub(crate) replace_me: bool,
    /// Reports on this replica, by reporter, for the current challenge.
    reports: BTreeMap<ReplicaId, Signed<CounterReport>>,
    /// Peers answered this status interval (a report costs a signature).
    served: BTreeSet<ReplicaId>,
}

impl FastBftReplica {
    /// After the enclave booted: a fresh cluster starts at genesis; an enclave that
    /// resumed is out of its view and waits for the next; a locked one asks to
    /// rejoin first.
    pub(super) fn after_boot(
        &mut self,
        recovered: &diffuse_core::protocol::Recovered,
        out: &mut Out,
    ) {
        if self.enclave_call(|e| e.is_locked()) {
            self.rejoin.locked = true;
            self.rejoin.log_lost = true;
            self.ask_to_rejoin(out);
            return;
        }
        if self.enclave_call(|e| e.fastbft_rejoin_nonce().is_some()) {
            // Reset by a REJOIN, and restarted again before it rejoined.
            self.rejoin.log_lost = true;
            self.out_of_view(out);
            return self.ask_for_rejoin_position(out);
        }
        // An enclave that never took a position: whatever the disk says (a replica
        // can execute replied batches before its stream reaches them), it starts
        // afresh.
        if self.enclave_call(|e| e.fastbft_counter()) == (0, 0) {
            if self.is_primary() {
                self.start_as_primary(out);
            }
            return;
        }
        if let Err(why) = self.recover(recovered, out) {
            self.halt(why, out);
        }
    }

    /// A restarted primary lost its pool and batches in flight: it asks to be
    /// replaced (the backups take its request alone as enough).
    pub(super) fn ask_to_be_replaced(&mut self, out: &mut Out) {
        self.rejoin.replace_me = true;
        out.broadcast(Message::ReqViewChange(crate::message::ReqViewChange {
            view: self.view.saturating_add(1),
            replace_me: true,
        }));
        if !self.stall_armed {
            self.stall_armed = true;
            out.set_timer(Timer::Stall, self.options.base.status_interval);
        }
    }

    /// The enclave is out of its view: so is the replica, waiting for the next.
    fn out_of_view(&mut self, out: &mut Out) {
        let (_, epoch) = self.enclave_call(|e| e.fastbft_counter());
        let leaving = self.enclave_call(|e| e.fastbft_leaving());
        self.view = view_of_epoch(epoch);
        self.vc.target = leaving;
        if let Some(target) = leaving {
            out.observe(diffuse_core::protocol::Observation::ViewChangeStarted {
                view: diffuse_core::ids::View(target),
            });
        }
    }

    /// Asks every peer for a report (on boot and every status interval while
    /// locked).
    pub(super) fn ask_to_rejoin(&mut self, out: &mut Out) {
        if !self.rejoin.locked {
            return;
        }
        if let Some(challenge) = self.enclave_call(|e| e.rejoin_challenge()) {
            out.broadcast(Message::Rejoin(challenge));
        }
        out.set_timer(Timer::Stall, self.options.base.status_interval);
        self.stall_armed = true;
    }

    /// A locked peer asks for a report on it: once per peer and status interval.
    pub(super) fn on_rejoin(&mut self, from: ReplicaId, challenge: Digest, out: &mut Out) {
        if self.rejoin.locked || !self.rejoin.served.insert(from) {
            return;
        }
        if self.rejoin.served.len() == 1 {
            out.set_timer(Timer::RejoinServed, self.options.base.status_interval);
        }
        let Some(key) = self.enclave_keys.get(from.index()).copied() else {
            return;
        };
        if let Some(report) = self.enclave_call(|e| e.report_counter(key, challenge)) {
            out.send(from, Message::RejoinReport(Box::new(report)));
        }
    }

    pub(super) fn on_rejoin_served_timer(&mut self) {
        self.rejoin.served.clear();
        if let Some(state) = self.primary.as_mut() {
            state.rejoins.served.clear();
        }
    }

    /// A report for this replica's REJOIN: with `f + 1` valid ones the enclave
    /// unlocks, out of the highest view they know.
    pub(super) fn on_rejoin_report(
        &mut self,
        from: ReplicaId,
        report: Signed<CounterReport>,
        out: &mut Out,
    ) {
        let Some(challenge) = self.enclave_call(|e| e.rejoin_challenge()) else {
            return; // not locked (any more)
        };
        if report.value.challenge != challenge {
            return; // for the challenge of an earlier reboot
        }
        let reporter = self.enclave_keys.get(from.index());
        if reporter != Some(&report.value.reporter) || !report.verify(&report.value.reporter) {
            return out.fault(from, "bad-rejoin-report");
        }
        self.rejoin.reports.insert(from, report);
        if self.rejoin.reports.len() <= self.f {
            return;
        }
        let reports: Vec<Signed<CounterReport>> = self.rejoin.reports.values().cloned().collect();
        if self.enclave_call(|e| e.reset_counter(&reports, 0)).is_err() {
            return;
        }
        self.rejoin.reports.clear();
        self.rejoin.locked = false;
        self.out_of_view(out);
        self.ask_for_rejoin_position(out);
        self.drain(out);
    }
}

/// New rejoin positions the primary certifies for one replica between two stable
/// checkpoints, at most: a faulty replica asking again and again costs a bounded
/// number of stream positions.
const REJOINS_PER_CHECKPOINT: u32 = 2;

/// What the primary gave each rejoining replica.
#[derive(Debug, Default)]
pub(crate) struct RejoinsGiven {
    /// By replica: the rejoin position's entry, the stream checkpoint then, and
    /// how many positions it got since that checkpoint.
    pub(crate) given:
        BTreeMap<ReplicaId, (crate::view_log::RejoinEntry, diffuse_core::ids::Seq, u32)>,
    /// Replicas answered this status interval.
    pub(crate) served: BTreeSet<ReplicaId>,
}

impl FastBftReplica {
    /// While the replica's log is lost (after a restart) and it is in no view:
    /// asks the primary of the view it is out of for a rejoin position.
    pub(super) fn ask_for_rejoin_position(&mut self, out: &mut Out) {
        if self.rejoin.replace_me && self.in_view() {
            return self.ask_to_be_replaced(out);
        }
        if !self.rejoin.log_lost || self.rejoin.locked {
            return;
        }
        // A restarted primary cannot rejoin its own view: it asks to be replaced.
        if self.is_primary() {
            out.broadcast(Message::ReqViewChange(crate::message::ReqViewChange {
                view: self.view.saturating_add(1),
                replace_me: true,
            }));
        } else if let Some(nonce) = self.enclave_call(|e| e.fastbft_rejoin_nonce()) {
            out.send(self.primary_id(), Message::RejoinRequest(nonce));
        }
        if !self.stall_armed {
            self.stall_armed = true;
            out.set_timer(Timer::Stall, self.options.base.status_interval);
        }
    }

    /// The primary: a restarted replica asks for a position to rejoin at. The
    /// position (a certificate over its nonce) is a position of the stream every
    /// replica takes; the replica gets the log up to it.
    pub(super) fn on_rejoin_request(&mut self, from: ReplicaId, nonce: Digest, out: &mut Out) {
        let Some(key) = self.enclave_keys.get(from.index()).copied() else {
            return;
        };
        if from == self.id || self.log.is_full() {
            return;
        }
        let checkpoint = self.stream.checkpoint;
        let Some(state) = self.primary.as_mut() else {
            return;
        };
        if !state.rejoins.served.insert(from) {
            return;
        }
        let first_served = state.rejoins.served.len() == 1;
        let previous = state.rejoins.given.get(&from).cloned();
        let log_start =
            crate::view_log::start_of(self.view, self.stable.as_ref()).unwrap_or((0, 0));
        // The tree sent along is the current epoch's: the position must be in it.
        let current_epoch = self.epoch.as_ref().map(|e| e.config.epoch);
        let entry = match previous {
            // The same request again (the answer was lost), while the log still
            // reaches back to the position given and its epoch goes on.
            Some((entry, _, _))
                if entry.nonce == nonce
                    && crate::message::position(&entry.cert) > log_start
                    && Some(entry.cert.view) == current_epoch =>
            {
                entry
            }
            Some((_, at, count)) if at == checkpoint && count >= REJOINS_PER_CHECKPOINT => return,
            _ => {
                let digest = diffuse_tee::rejoin_digest(&key, &nonce);
                let Ok(cert) = self.enclave_call(|e| e.request_counter(&digest)) else {
                    return;
                };
                let entry = crate::view_log::RejoinEntry {
                    replica: from,
                    nonce,
                    cert,
                };
                let count = match previous {
                    Some((_, at, count)) if at == checkpoint => count + 1,
                    _ => 1,
                };
                self.primary_issued_rejoin(entry.clone(), checkpoint, count, out);
                entry
            }
        };
        if first_served {
            out.set_timer(Timer::RejoinServed, self.options.base.status_interval);
        }
        self.send_rejoin_state(from, &entry, out);
    }

    /// The primary: a replica fetches positions older than this primary keeps
    /// for FETCH answers. It gets the log (up to the primary's position) and jumps
    /// there (`on_rejoin_state`); once per replica and status interval.
    pub(super) fn send_catch_up(&mut self, to: ReplicaId, out: &mut Out) {
        let Some(state) = self.primary.as_mut() else {
            return;
        };
        if !state.rejoins.served.insert(to) {
            return;
        }
        if state.rejoins.served.len() == 1 {
            out.set_timer(Timer::RejoinServed, self.options.base.status_interval);
        }
        let Some(config) = self.epoch.as_ref().map(|e| e.config.clone()) else {
            return;
        };
        let log = self.log.to_view_log(self.view, self.stable.as_ref());
        let stable = super::stable_seq(self.stable.as_ref());
        let updates = self.primary_updates_above(stable);
        out.send(
            to,
            Message::RejoinState(Box::new(crate::message::RejoinState {
                log,
                config,
                updates: diffuse_core::codec::BoundedVec::truncating(updates),
            })),
        );
    }

    /// Sends a rejoining replica the log up to its rejoin position.
    fn send_rejoin_state(
        &mut self,
        to: ReplicaId,
        entry: &crate::view_log::RejoinEntry,
        out: &mut Out,
    ) {
        let Some(config) = self.epoch.as_ref().map(|e| e.config.clone()) else {
            return;
        };
        let mut log = self.log.to_view_log(self.view, self.stable.as_ref());
        let end = crate::message::position(&entry.cert);
        let kept: Vec<crate::view_log::LogEntry> = log
            .entries
            .iter()
            .filter(|e| crate::message::position(e.cert()) <= end)
            .cloned()
            .collect();
        log.entries = diffuse_core::codec::BoundedVec::truncating(kept);
        let stable = super::stable_seq(self.stable.as_ref());
        let updates = self.primary_updates_above(stable);
        out.send(
            to,
            Message::RejoinState(Box::new(crate::message::RejoinState {
                log,
                config,
                updates: diffuse_core::codec::BoundedVec::truncating(updates),
            })),
        );
    }

    /// A backup takes a rejoin position: only what the primary's certificate binds.
    pub(super) fn step_rejoined(&mut self, entry: crate::view_log::RejoinEntry, out: &mut Out) {
        let logged = crate::view_log::LogEntry::Rejoin(entry);
        if !logged.binds(&self.enclave_keys) {
            return self.primary_misbehaved("bad-rejoin", out);
        }
        if !self.follow(logged.cert()) {
            return self.primary_misbehaved("bad-rejoin", out);
        }
        self.log.record(logged);
    }

    /// The primary's log, for a rejoining replica (ending at its rejoin position)
    /// or for one too far behind to catch up position by position (ending at the
    /// primary's position). Checked like a VIEW-CHANGE's; then the enclave jumps
    /// to its end (`rejoin_at` over the replica's nonce, or `follow_to`), and the
    /// replica takes the log as its own, the stream's state from replaying it, the
    /// tree, the stable checkpoint (its state by transfer) and the replied batches.
    pub(super) fn on_rejoin_state(
        &mut self,
        from: ReplicaId,
        state: crate::message::RejoinState,
        out: &mut Out,
    ) {
        if self.rejoin.locked {
            return;
        }
        let log = state.log;
        let view = log.view;
        let rules = self.rules();
        let nonce = self.enclave_call(|e| e.fastbft_rejoin_nonce());
        let Some(last) = log.entries.last().cloned() else {
            return;
        };
        let rejoin = match &last {
            crate::view_log::LogEntry::Rejoin(entry)
                if self.rejoin.log_lost
                    && Some(entry.nonce) == nonce
                    && entry.replica == self.id =>
            {
                true
            }
            _ if !self.rejoin.log_lost && self.in_view() && view == self.view => false,
            _ => return,
        };
        // Where the log reaches, and (after a final NEW-TREE) the position before.
        let last_position = crate::message::position(last.cert());
        let (end, final_tree) = match &last {
            crate::view_log::LogEntry::NewTree(tree) => {
                ((last_position.0.saturating_add(1), 0), Some(tree.clone()))
            }
            _ => (last_position, None),
        };
        if from != crate::checkpoint::primary_of(view, self.n)
            || diffuse_tee::view_of_epoch(last_position.0) != view
            || view < self.view
            || (!rejoin && end <= self.next_position())
            || crate::view_log::check_log(&log, end, &rules).is_err()
        {
            if rejoin {
                out.fault(from, "bad-rejoin-state");
            }
            return;
        }
        let (stream, batches) = crate::view_log::replay(&log, &rules);
        let Some(primary) = crate::checkpoint::primary_key(&self.enclave_keys, view) else {
            return;
        };
        self.view = view;
        let config = final_tree
            .as_ref()
            .map_or(state.config, |t| t.config.clone());
        let tree = match self.check_config(&config) {
            Some(tree) if config.epoch == end.0 => tree,
            _ => return out.fault(from, "bad-rejoin-state"),
        };
        let jumped = if rejoin {
            self.enclave_call(|e| e.rejoin_at(&primary, last.cert()))
        } else {
            // To the position before a final NEW-TREE, then through it (passive).
            let target = match &final_tree {
                Some(_) => log.entries.iter().rev().nth(1).map(|e| e.cert().clone()),
                None => Some(last.cert().clone()),
            };
            match target {
                Some(target) => self.enclave_call(|e| {
                    e.follow_to(&primary, &target)?;
                    match &final_tree {
                        Some(tree) => e.update_view(&primary, &tree.cert, None),
                        None => Ok(()),
                    }
                }),
                None => return,
            }
        };
        if jumped.is_err() {
            return;
        }
        // From here on a passive replica of the view, at the log's end.
        self.vc.target = None;
        self.rejoin.log_lost = false;
        for (at, _) in std::mem::take(&mut self.rounds) {
            out.cancel_timer(Timer::Round(at.0, at.1));
        }
        self.epoch = Some(super::Epoch { config, tree });
        self.stream = stream;
        let checkpoint = log.checkpoint.clone().or_else(|| {
            log.base
                .as_ref()
                .and_then(|b| b.decision.checkpoint.clone())
        });
        self.log.replace(super::log::PositionLog::recovered(log));
        self.held = self.held.split_off(&(end.0, end.1.saturating_add(1)));
        self.packages = self.packages.split_off(&(end.0, end.1.saturating_add(1)));
        self.fetched_at = None;
        if rejoin {
            out.observe(diffuse_core::protocol::Observation::ViewInstalled {
                view: diffuse_core::ids::View(view),
            });
        }
        if let Some(proof) = checkpoint {
            self.adopt_stable(proof, out);
        }
        // The batches its stream fixed, for the COMMITs still to come.
        for (seq, batch) in batches {
            self.remember_batch(seq, batch);
        }
        for update in state.updates.into_inner() {
            let root = crate::message::batch_root(&update.batch);
            if self.update_is_valid(&update, &root) {
                self.add_commit(
                    update.seq,
                    update.batch,
                    root,
                    update.results_root,
                    update.state,
                    out,
                );
            }
        }
        self.drain(out);
    }
}
