//! What a replica persists, and how a restart reads it back.
//!
//! | key | value | written |
//! |---|---|---|
//! | `pbft/view` | view number, active or changing | before a VIEW-CHANGE or the PREPAREs of a NEW-VIEW leave |
//! | `pbft/new-view` | the NEW-VIEW of the current view | with the view |
//! | `pbft/slot/<seq>` | accepted proposal (only if this replica voted for it), prepared certificate, batch bodies | in the normal case after the PREPARE (or, as primary, the PRE-PREPARE) left, unawaited; before the COMMIT leaves; before the PREPAREs of a NEW-VIEW leave; for a slot whose vote is withheld, before anything after it |
//! | `pbft/ahead` | a view and a sequence number: the bound on the votes sent ahead of their slots' writes | before the first vote above the previous bound leaves; deleted at a scheduled shutdown, after every other write |
//! | `pbft/checkpoint/<seq>` | the state after executing `seq` | before this replica's CHECKPOINT vote leaves: the vote promises it can serve that state |
//! | `pbft/stable` | stable checkpoint certificate | when a checkpoint becomes stable or state transfer completes; slots up to it and older checkpoints are deleted in the same write |
//!
//! Executed state is not written per batch: a restarted replica restores its highest
//! checkpoint and executes again what it learns is committed above it.
//!
//! PBFT's safety needs a correct replica never to vote twice differently, and never
//! to forget a certificate it reported by a COMMIT. Certificates are durable before
//! the COMMIT leaves. A vote (PRE-PREPARE or PREPARE) leaves *ahead* of its slot's
//! write, which a crash may lose; but only below `pbft/ahead`, durable first. A
//! restarted replica casts no new vote in that view up to that bound (the slots it
//! finds on disk are the votes it knows it cast), and as that view's primary
//! proposes nothing more in it. See `docs/protocols/pbft.md`, "Votes ahead of
//! their writes".

use super::{Out, PbftReplica};
use crate::message::{Batch, NewView, PrepareVote, PreparedCert, Proposal};
use crate::options::Mutant;
use diffuse_core::codec::{self, BoundedVec};
use diffuse_core::crypto::Signed;
use diffuse_core::ids::{Seq, View};
use diffuse_core::protocol::{Recovered, WriteOp};
use diffuse_core::service::StateSnapshot;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const VIEW_KEY: &[u8] = b"pbft/view";
const NEW_VIEW_KEY: &[u8] = b"pbft/new-view";
const STABLE_KEY: &[u8] = b"pbft/stable";
const SLOT_PREFIX: &[u8] = b"pbft/slot/";
const CHECKPOINT_PREFIX: &[u8] = b"pbft/checkpoint/";
const AHEAD_KEY: &[u8] = b"pbft/ahead";

#[derive(Serialize, Deserialize)]
struct ViewRecord {
    view: View,
    active: bool,
}

/// Votes may have left ahead of their writes in `view` up to `seq`.
#[derive(Serialize, Deserialize)]
struct AheadRecord {
    view: View,
    seq: Seq,
}

#[derive(Serialize, Deserialize)]
struct SlotRecord {
    proposal: Option<Signed<Proposal>>,
    prepared: Option<PreparedCert>,
    bodies: BoundedVec<Batch, 3>,
}

fn seq_key(prefix: &[u8], seq: Seq) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&seq.0.to_be_bytes());
    key
}

fn slot_key(seq: Seq) -> Vec<u8> {
    seq_key(SLOT_PREFIX, seq)
}

fn checkpoint_key(seq: Seq) -> Vec<u8> {
    seq_key(CHECKPOINT_PREFIX, seq)
}

/// The sequence number at the end of a `prefix || seq` key.
fn key_seq(prefix: &[u8], key: &[u8]) -> Result<Seq, CorruptStorage> {
    let bytes: [u8; 8] = key[prefix.len()..]
        .try_into()
        .map_err(|_| CorruptStorage("key"))?;
    Ok(Seq(u64::from_be_bytes(bytes)))
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
            proposal: slot.proposal.clone().filter(|_| !slot.vote_withheld),
            prepared: slot.prepared.clone(),
            bodies: BoundedVec::truncating(slot.bodies().map(|b| (**b).clone()).collect()),
        };
        vec![WriteOp::Put {
            key: slot_key(seq),
            value: codec::encode_payload(&record),
        }]
    }

    /// Before a vote for `seq` leaves ahead of its slot's write: extends the
    /// persisted bound to the top of the window if it does not cover `seq` in this
    /// view. The bound is an awaited write, so the vote that needs it waits for it:
    /// one vote per window's worth of sequence numbers.
    pub(super) fn cover_vote_ahead(&mut self, seq: Seq, out: &mut Out) {
        let view = self.view;
        if self
            .ahead_bound
            .is_some_and(|(v, bound)| v == view && bound >= seq)
        {
            return;
        }
        let bound = (view, self.high().max(seq));
        self.ahead_bound = Some(bound);
        out.persist(vec![WriteOp::Put {
            key: AHEAD_KEY.to_vec(),
            value: codec::encode_payload(&AheadRecord {
                view: bound.0,
                seq: bound.1,
            }),
        }]);
    }

    /// At a scheduled shutdown, after every earlier write is durable: every vote
    /// this replica sent is in a slot on disk, so the bound goes, and the next
    /// start votes (and proposes) as before.
    pub(super) fn clean_shutdown_writes(&mut self) -> Vec<WriteOp> {
        self.ahead_bound = None;
        vec![WriteOp::Delete {
            key: AHEAD_KEY.to_vec(),
        }]
    }

    /// Whether a crash may have lost a vote this replica cast for `seq` in the
    /// current view: it must not cast one now.
    pub(super) fn vote_may_be_lost(&self, seq: Seq) -> bool {
        self.lost_votes_bound
            .is_some_and(|(view, bound)| view == self.view && seq <= bound)
    }

    /// This replica's checkpoint at `seq`.
    pub(super) fn checkpoint_writes(&self, seq: Seq, snapshot: &StateSnapshot) -> Vec<WriteOp> {
        vec![WriteOp::Put {
            key: checkpoint_key(seq),
            value: snapshot.to_record(),
        }]
    }

    /// The stable checkpoint certificate, and deletion of the slots and older
    /// checkpoints it makes obsolete. Its state was written as a checkpoint before.
    pub(super) fn stable_writes(&self) -> Vec<WriteOp> {
        vec![
            WriteOp::Put {
                key: STABLE_KEY.to_vec(),
                value: codec::encode_payload(&self.stable),
            },
            WriteOp::DeleteRange {
                start: slot_key(Seq(0)),
                end: slot_key(self.low().next()),
            },
            WriteOp::DeleteRange {
                start: checkpoint_key(Seq(0)),
                end: checkpoint_key(self.low()),
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
        if self.needs_state {
            self.start_transfer(out);
        }
        self.broadcast_status(out);
    }

    fn load(&mut self, recovered: &Recovered) -> Result<(), CorruptStorage> {
        if let Some(bytes) = recovered.get(VIEW_KEY) {
            let record: ViewRecord =
                codec::decode_payload(bytes).map_err(|_| CorruptStorage("view"))?;
            self.view = record.view;
            self.view_active = record.active;
        }
        if let Some(bytes) = recovered.get(AHEAD_KEY) {
            let record: AheadRecord =
                codec::decode_payload(bytes).map_err(|_| CorruptStorage("ahead"))?;
            self.ahead_bound = Some((record.view, record.seq));
            if !self.options.is(Mutant::ForgetLostVotes) {
                self.lost_votes_bound = self.ahead_bound;
            }
        }
        if let Some(bytes) = recovered.get(STABLE_KEY) {
            self.stable = codec::decode_payload(bytes).map_err(|_| CorruptStorage("stable"))?;
        }
        self.load_checkpoints(recovered)?;
        if let Some(bytes) = recovered.get(NEW_VIEW_KEY) {
            let new_view: NewView =
                codec::decode_payload(bytes).map_err(|_| CorruptStorage("new view"))?;
            if self.view_active && new_view.view == self.view {
                self.current_new_view = Some(Arc::new(new_view));
            }
        }
        for (key, value) in recovered.with_prefix(SLOT_PREFIX) {
            let seq = key_seq(SLOT_PREFIX, key)?;
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

    /// Reads this replica's checkpoints: the stable one becomes the state to serve,
    /// and the replica resumes from the highest one it has.
    fn load_checkpoints(&mut self, recovered: &Recovered) -> Result<(), CorruptStorage> {
        let low = self.stable.seq;
        let mut checkpoints = std::collections::BTreeMap::new();
        for (key, value) in recovered.with_prefix(CHECKPOINT_PREFIX) {
            let seq = key_seq(CHECKPOINT_PREFIX, key)?;
            if seq < low {
                continue;
            }
            let snapshot = StateSnapshot::from_record(value).ok_or(CorruptStorage("checkpoint"))?;
            checkpoints.insert(seq, snapshot);
        }
        if low > Seq(0) {
            match checkpoints.remove(&low) {
                Some(snapshot) if snapshot.digest == self.stable.state => {
                    self.stable_snapshot = Some(snapshot)
                }
                Some(_) => return Err(CorruptStorage("stable checkpoint digest")),
                None => {
                    self.stable_snapshot = None;
                    self.needs_state = true;
                }
            }
        }
        let resume = checkpoints
            .last_key_value()
            .map(|(seq, snapshot)| (*seq, snapshot.bytes.clone()))
            .or_else(|| {
                self.stable_snapshot
                    .as_ref()
                    .map(|s| (low, s.bytes.clone()))
            });
        if let Some((seq, bytes)) = resume {
            self.service
                .restore(&bytes)
                .map_err(|_| CorruptStorage("checkpoint state"))?;
            self.last_executed = seq;
            self.needs_state = false;
        }
        self.own_checkpoints = checkpoints;
        Ok(())
    }

    /// Rebuilds a slot, including this replica's own votes: a slot's proposal is
    /// persisted only with this replica's vote for it, and the certificate before
    /// the COMMIT left.
    fn restore_slot(&mut self, seq: Seq, record: SlotRecord) {
        let (view, active, id, primary) = (self.view, self.view_active, self.id, self.primary());
        let slot = self.log.entry(seq).or_default();
        slot.prepared = record.prepared;
        if record.proposal.is_none() {
            // A slot whose vote was withheld: it may have prepared on the others'
            // votes. It keeps the proposal of its certificate (so that it counts,
            // and sends again, its own COMMIT) but still withholds its vote.
            if let Some(cert) = slot
                .prepared
                .as_ref()
                .filter(|c| active && c.proposal.view == view)
            {
                let (proposal, digest) = (cert.proposal.clone(), cert.proposal.digest);
                slot.proposal = Some(proposal);
                slot.vote_withheld = true;
                slot.commits.insert(id, digest);
            }
        }
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
