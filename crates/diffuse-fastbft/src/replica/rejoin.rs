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
    /// Reports on this replica, by reporter, for the current challenge.
    reports: BTreeMap<ReplicaId, Signed<CounterReport>>,
    /// Peers answered this status interval (a report costs a signature).
    served: BTreeSet<ReplicaId>,
}

impl FastBftReplica {
    /// After the enclave booted: a fresh cluster starts at genesis; an enclave that
    /// resumed is out of its view and waits for the next; a locked one asks to
    /// rejoin first.
    pub(super) fn after_boot(&mut self, out: &mut Out) {
        if self.enclave_call(|e| e.is_locked()) {
            self.rejoin.locked = true;
            self.rejoin.log_lost = true;
            self.ask_to_rejoin(out);
            return;
        }
        if self.enclave_call(|e| e.fastbft_leaving().is_some()) {
            self.rejoin.log_lost = true;
            self.out_of_view(out);
            return;
        }
        if self.is_primary() {
            self.start_as_primary(out);
        }
    }

    /// The enclave is out of its view: so is the replica, waiting for the next.
    fn out_of_view(&mut self, out: &mut Out) {
        let (_, epoch) = self.enclave_call(|e| e.fastbft_counter());
        let leaving = self.enclave_call(|e| e.fastbft_leaving());
        self.view = view_of_epoch(epoch);
        self.vc.target = leaving;
        self.vc.note_asked(self.view.saturating_add(1));
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
        self.drain(out);
    }
}
