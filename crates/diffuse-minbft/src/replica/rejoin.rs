//! REJOIN after an unscheduled reboot (FastBFT §6.1).
//!
//! The enclave comes back locked: it certifies nothing until `f + 1` peers' enclaves
//! report the highest counter of it they accepted, signed over its fresh challenge.
//! It then continues above the highest report and above the highest counter the
//! host persisted (every certified message is persisted before it leaves), so an
//! honest replica never reuses a counter value. Peers refuse to report on the
//! primary of their view (or of the view they are moving to): a primary could
//! otherwise get a report, reboot on purpose, and certify a second message under a
//! counter value it already used; it rejoins after the view change.

use super::{MinBftReplica, Out};
use crate::message::Message;
use diffuse_core::crypto::{Digest, Signed};
use diffuse_core::ids::ReplicaId;
use diffuse_core::quorum::ReplicaSet;
use diffuse_tee::CounterReport;
use std::collections::BTreeMap;

/// REJOIN state: the reports collected while locked, and the answers given.
#[derive(Debug, Default)]
pub(crate) struct RejoinState {
    /// Reports on this replica's counter, by reporter, for the current challenge.
    reports: BTreeMap<ReplicaId, Signed<CounterReport>>,
    /// Peers answered this status interval (a report costs a signature).
    pub reports_served: ReplicaSet,
}

impl MinBftReplica {
    /// Asks every peer for a counter report (every status interval while locked).
    pub(super) fn ask_to_rejoin(&mut self, out: &mut Out) {
        if let Some(challenge) = self.with_enclave(|e| e.rejoin_challenge()).flatten() {
            out.broadcast(Message::Rejoin(challenge));
        }
    }

    /// A locked peer asks for a report on its counter.
    pub(super) fn on_rejoin(&mut self, from: ReplicaId, challenge: Digest, out: &mut Out) {
        let n = self.n();
        let leads = self.primary() == from || self.vc.target.is_some_and(|t| t.primary(n) == from);
        if leads || !self.rejoin.reports_served.insert(from) {
            return;
        }
        let Some(key) = self.enclave_keys.get(from.index()).copied() else {
            return;
        };
        if let Some(report) = self
            .with_enclave(|e| e.report_counter(key, challenge))
            .flatten()
        {
            out.send(from, Message::RejoinReport(Box::new(report)));
        }
    }

    /// A report for this replica's REJOIN: with `f + 1` valid ones, the enclave
    /// resets its counter and the replica takes part again.
    pub(super) fn on_rejoin_report(
        &mut self,
        from: ReplicaId,
        report: Signed<CounterReport>,
        out: &mut Out,
    ) {
        let Some(challenge) = self.with_enclave(|e| e.rejoin_challenge()).flatten() else {
            return; // not locked (any more)
        };
        if report.value.challenge != challenge {
            return; // late: for the challenge of an earlier reboot
        }
        let reporter = self.enclave_keys.get(from.index());
        if reporter != Some(&report.value.reporter) || !report.verify(&report.value.reporter) {
            return out.fault(from, "bad-rejoin-report");
        }
        self.rejoin.reports.insert(from, report);
        if self.rejoin.reports.len() <= self.quorum.f() {
            return;
        }
        let persisted = self.sent.back().map_or(0, |m| m.counter());
        let reports: Vec<Signed<CounterReport>> = self.rejoin.reports.values().cloned().collect();
        let reset = self.with_enclave(|e| e.reset_counter(&reports, persisted));
        if !matches!(reset, Some(Ok(()))) {
            return;
        }
        self.rejoin.reports.clear();
        self.certify_stable_if_enclave_behind(out);
        self.drain_streams(out);
        self.ensure_request_timer(out);
        self.propose_batches(false, out);
    }
}
