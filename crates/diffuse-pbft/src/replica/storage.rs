//! What a replica persists, and how a restart reads it back.
//!
//! | key | value | written |
//! |---|---|---|
//! | `pbft/view` | view number, active or changing | before a VIEW-CHANGE or the PREPAREs of a NEW-VIEW leave |
//! | `pbft/new-view` | the NEW-VIEW of the current view | with the view |
//! | `pbft/slot/<seq>` | accepted proposal, prepared certificate, batch bodies | before the PREPARE (or, as primary, the PRE-PREPARE) and before the COMMIT leave |
//! | `pbft/stable` | stable checkpoint certificate and its state | when a checkpoint becomes stable or state transfer completes; slots up to it are deleted in the same write |
//!
//! Executed state is not written per batch: a restarted replica restores its stable
//! checkpoint and executes again what it learns is committed above it. Nothing a
//! correct replica voted for is forgotten, which is what PBFT's safety needs.

use super::{Out, PbftReplica};
use crate::message::{
    Batch, CheckpointCert, Message, NewView, PrepareVote, PreparedCert, Proposal, Status,
};
use diffuse_core::codec::{self, Blob, BoundedVec};
use diffuse_core::crypto::{Digest, Signed};
use diffuse_core::ids::{Seq, View};
use diffuse_core::protocol::{Recovered, WriteOp};
use diffuse_core::service::{MAX_SNAPSHOT_BYTES, STATE_LABEL};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const VIEW_KEY: &[u8] = b"pbft/view";
const NEW_VIEW_KEY: &[u8] = b"pbft/new-view";
const STABLE_KEY: &[u8] = b"pbft/stable";
const SLOT_PREFIX: &[u8] = b"pbft/slot/";

#[derive(Serialize, Deserialize)]
struct ViewRecord {
    view: View,
    active: bool,
}

#[derive(Serialize, Deserialize)]
struct StableRecord {
    cert: CheckpointCert,
    state: Blob<MAX_SNAPSHOT_BYTES>,
}

#[derive(Serialize, Deserialize)]
struct SlotRecord {
    proposal: Option<Signed<Proposal>>,
    prepared: Option<PreparedCert>,
    bodies: BoundedVec<Batch, 3>,
}

fn slot_key(seq: Seq) -> Vec<u8> {
    let mut key = SLOT_PREFIX.to_vec();
    key.extend_from_slice(&seq.0.to_be_bytes());
    key
}

/// Why persisted state could not be read back.
#[derive(Debug)]
struct CorruptStorage(&'static str);

impl PbftReplica {
    /// The view record (and the NEW-VIEW that started the view, if active).
    pub(super) fn view_writes(&self) -> Vec<WriteOp> {
        let record = ViewRecord {
            view: self.view,
            active: self.view_active,
        };
        let mut writes = vec![WriteOp::Put {
            key: VIEW_KEY.to_vec(),
            value: codec::encode_payload(&record),
        }];
        writes.push(match &self.current_new_view {
            Some(nv) => WriteOp::Put {
                key: NEW_VIEW_KEY.to_vec(),
                value: codec::encode_payload(&**nv),
            },
            None => WriteOp::Delete {
                key: NEW_VIEW_KEY.to_vec(),
            },
        });
        writes
    }

    /// The record of slot `seq`.
    pub(super) fn slot_writes(&self, seq: Seq) -> Vec<WriteOp> {
        let Some(slot) = self.log.get(&seq) else {
            return Vec::new();
        };
        let record = SlotRecord {
            proposal: slot.proposal.clone(),
            prepared: slot.prepared.clone(),
            bodies: BoundedVec::truncating(slot.bodies().map(|b| (**b).clone()).collect()),
        };
        vec![WriteOp::Put {
            key: slot_key(seq),
            value: codec::encode_payload(&record),
        }]
    }

    /// The stable checkpoint with its state, and deletion of the slots it covers.
    pub(super) fn stable_writes(&self) -> Vec<WriteOp> {
        let Some(state) = &self.stable_snapshot else {
            return Vec::new();
        };
        let record = StableRecord {
            cert: self.stable.clone(),
            state: Blob::try_from_vec(state.to_vec()).unwrap_or_default(),
        };
        vec![
            WriteOp::Put {
                key: STABLE_KEY.to_vec(),
                value: codec::encode_payload(&record),
            },
            WriteOp::DeleteRange {
                start: slot_key(Seq(0)),
                end: slot_key(self.low().next()),
            },
        ]
    }

    /// Starts the replica, from persisted state if there is any.
    pub(super) fn on_start(&mut self, recovered: Recovered, out: &mut Out) {
        self.start_status_timer(out);
        if recovered.is_empty() {
            return;
        }
        if let Err(CorruptStorage(what)) = self.load(&recovered) {
            // Starting without the persisted votes could make this replica vote twice:
            // it stays out of the protocol instead.
            let _ = what;
            out.fault(self.id, "corrupt-storage");
            self.halted = true;
            return;
        }
        self.status.recovering = true;
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

    fn load(&mut self, recovered: &Recovered) -> Result<(), CorruptStorage> {
        if let Some(bytes) = recovered.get(VIEW_KEY) {
            let record: ViewRecord =
                codec::decode_payload(bytes).map_err(|_| CorruptStorage("view"))?;
            self.view = record.view;
            self.view_active = record.active;
        }
        if let Some(bytes) = recovered.get(STABLE_KEY) {
            let record: StableRecord =
                codec::decode_payload(bytes).map_err(|_| CorruptStorage("stable"))?;
            if Digest::of(STATE_LABEL, &record.state) != record.cert.state {
                return Err(CorruptStorage("stable state digest"));
            }
            self.service
                .restore(&record.state)
                .map_err(|_| CorruptStorage("stable state"))?;
            self.last_executed = record.cert.seq;
            self.stable = record.cert;
            self.stable_snapshot = Some(Arc::new(record.state.into_inner()));
        }
        if let Some(bytes) = recovered.get(NEW_VIEW_KEY) {
            let new_view: NewView =
                codec::decode_payload(bytes).map_err(|_| CorruptStorage("new view"))?;
            if self.view_active && new_view.view == self.view {
                self.current_new_view = Some(Arc::new(new_view));
            }
        }
        for (key, value) in recovered.with_prefix(SLOT_PREFIX) {
            let seq_bytes: [u8; 8] = key[SLOT_PREFIX.len()..]
                .try_into()
                .map_err(|_| CorruptStorage("slot key"))?;
            let seq = Seq(u64::from_be_bytes(seq_bytes));
            let record: SlotRecord =
                codec::decode_payload(value).map_err(|_| CorruptStorage("slot"))?;
            if self.in_window(seq) {
                self.restore_slot(seq, record);
            }
        }
        self.next_seq = self
            .log
            .iter()
            .filter(|(_, s)| s.proposal.is_some())
            .map(|(seq, _)| *seq)
            .max()
            .unwrap_or(self.low())
            .max(self.low())
            .next();
        if !self.view_active {
            let vc = self.build_view_change(self.view);
            self.view_change.own = Some(vc.clone());
            self.view_change.received.insert(self.id, vc);
        }
        Ok(())
    }

    /// Rebuilds a slot, including this replica's own votes: it persisted the
    /// proposal before sending PREPARE and the certificate before sending COMMIT.
    fn restore_slot(&mut self, seq: Seq, record: SlotRecord) {
        let (view, active, id, primary) = (self.view, self.view_active, self.id, self.primary());
        let slot = self.log.entry(seq).or_default();
        slot.prepared = record.prepared;
        if let Some(proposal) = record.proposal.filter(|p| active && p.view == view) {
            if id != primary {
                let prepare = Signed::sign(
                    PrepareVote {
                        view,
                        seq,
                        digest: proposal.digest,
                        replica: id,
                    },
                    &self.secret,
                );
                slot.prepares.insert(id, prepare);
            }
            let digest = proposal.digest;
            slot.proposal = Some(proposal);
            if slot.prepared_in_current_view() {
                slot.commits.insert(id, digest);
            }
        }
        for body in record.bodies.into_inner() {
            slot.add_body(body.digest(), Arc::new(body));
        }
    }
}
