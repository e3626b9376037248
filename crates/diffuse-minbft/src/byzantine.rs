//! MinBFT-specific Byzantine behaviours for the simulator.
//!
//! Each runs on top of an honest replica and rewrites its traffic. The faulty host
//! cannot make a protected enclave certify two messages with one counter value, so
//! its lies are certified messages it hides from some replicas (`withhold`),
//! messages whose certificates do not match (`forge-ui`), which every receiver must
//! reject without being misled, an attempt to roll its enclave back to an old
//! sealed state (`rollback`), which only an unprotected enclave lets through, and
//! calls of its own into the live enclave (`equivocate`, `skip-counter`), which
//! get fresh counter values and so leave gaps and conflicts that receivers must
//! hold or reject.

use crate::message::{Certified, CheckpointCert, Message, Prepare};
use crate::options::MinBftOptions;
use crate::tee_host::TeeHost;
use diffuse_core::codec::BoundedVec;
use diffuse_core::crypto::Digest;
use diffuse_core::ids::{NodeId, ReplicaId, Seq};
use diffuse_core::suite::{Behaviour, Coalition, Entropy, Named, Outgoing, ReplicaSetup};
use diffuse_pbft::message::Batch;
use diffuse_tee::{Scope, TrustedComponent, Ui};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The MinBFT-specific behaviours.
pub const BEHAVIOURS: &[Named] = &[
    Named {
        name: "withhold",
        description: "sends its certified messages to one correct replica only (never answering the others' fetches), then falls silent: the view change must keep what that replica committed",
    },
    Named {
        name: "rollback",
        description: "as primary, has its host restore an old sealed enclave state to certify a second PREPARE under a counter value already used, and sends it to half of the replicas (a protected enclave comes up locked)",
    },
    Named {
        name: "equivocate",
        description: "as primary, asks its enclave a second time for each of its first PREPAREs, with another batch for the same slot, sends each version to half of the replicas and both to whoever fetches (the second gets the next counter value)",
    },
    Named {
        name: "skip-counter",
        description: "has its enclave certify a throwaway message after its 20th certified one, so its stream has a counter value no message carries: the others must hold everything it sends later",
    },
    Named {
        name: "forge-ui",
        description: "alters certified messages under their UI, replays old ones, claims other senders, sends forged checkpoint certificates, and alters what it sends outside the streams (PREPARE and VIEW-CHANGE copies, NEW-VIEW proofs, stable certificates, REJOIN reports)",
    },
];

/// Builds the behaviour `name` for the replica of `setup`, one of `coalition`.
pub fn build(
    name: &str,
    setup: &ReplicaSetup<MinBftOptions>,
    coalition: &Coalition,
) -> Option<Box<dyn Behaviour<Message>>> {
    let n = setup.keys.n();
    let favoured = (0..n as u16)
        .map(ReplicaId)
        .find(|r| !coalition.members().contains(r))?;
    match name {
        "withhold" => Some(Box::new(Withhold {
            favoured,
            certified_sent: 0,
        })),
        "rollback" => Some(Box::new(Rollback {
            me: setup.id,
            n,
            tee: setup.options.tee.clone(),
            tried: false,
            forged: None,
        })),
        "equivocate" => Some(Box::new(Equivocate {
            me: setup.id,
            n,
            tee: setup.options.tee.clone(),
            twins: BTreeMap::new(),
            misled: BTreeSet::new(),
        })),
        "skip-counter" => Some(Box::new(SkipCounter {
            me: setup.id,
            tee: setup.options.tee.clone(),
            certified_seen: BTreeSet::new(),
            skipped: false,
        })),
        "forge-ui" => Some(Box::new(ForgeUi {
            me: setup.id,
            n,
            seen: VecDeque::new(),
        })),
        _ => None,
    }
}

/// Certified messages sent before falling silent.
const WITHHOLD_BEFORE_SILENCE: u64 = 40;

struct Withhold {
    favoured: ReplicaId,
    certified_sent: u64,
}

impl Behaviour<Message> for Withhold {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        _entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        let to_replica = matches!(to, NodeId::Replica(_));
        if to_replica && self.certified_sent >= WITHHOLD_BEFORE_SILENCE {
            return; // silent towards replicas; clients still get replies
        }
        if let Message::Certified(_) = &message {
            if to != NodeId::Replica(self.favoured) {
                return;
            }
            self.certified_sent += 1;
        }
        out.push(Outgoing::now(to, message));
    }

    fn incoming(
        &mut self,
        from: NodeId,
        message: &Message,
        _entropy: &mut dyn Entropy,
        _out: &mut Vec<Outgoing<Message>>,
    ) -> bool {
        // Fetches from the replicas it withholds from go unanswered.
        !matches!(message, Message::StreamFetch(_)) || from == NodeId::Replica(self.favoured)
    }
}

/// The rollback attack (FastBFT §6.1): the host starts a second copy of the
/// enclave from an old sealed state, advances it to a counter value the honest
/// enclave already used for a PREPARE, and certifies a different PREPARE for the
/// same slot under it. The replicas in the upper half of the ids get the second
/// one. Tried once, on the first own PREPARE.
struct Rollback {
    me: ReplicaId,
    n: usize,
    tee: TeeHost,
    tried: bool,
    /// The attacked counter value and the second PREPARE certified under it.
    forged: Option<(u64, Prepare)>,
}

impl Rollback {
    fn forge(&self, original: &Prepare) -> Option<(u64, Prepare)> {
        let mut copy = self.tee.roll_back(self.me).ok()?;
        let counter = original.ui.counter;
        while copy.counter().saturating_add(1) < counter {
            copy.create_ui(&Digest::default()).ok()?;
        }
        let forged = conflicting_prepare(original, |scope, digest| {
            copy.create_scoped_ui(scope, digest).ok()
        })?;
        (forged.ui.counter == counter).then_some((counter, forged))
    }
}

impl Behaviour<Message> for Rollback {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        _entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        if let Message::Certified(Certified::Prepare(prepare)) = &message {
            if !self.tried && prepare.replica == self.me {
                self.tried = true;
                self.forged = self.forge(prepare);
            }
            let upper_half = matches!(to, NodeId::Replica(r) if r.index() * 2 >= self.n);
            if let Some((counter, forged)) = &self.forged {
                if *counter == prepare.ui.counter && upper_half {
                    let forged = Message::Certified(Certified::Prepare(forged.clone()));
                    return out.push(Outgoing::now(to, forged));
                }
            }
        }
        out.push(Outgoing::now(to, message));
    }
}

/// How many of its PREPAREs the `equivocate` primary doubles.
const TWINS: usize = 8;

/// A primary whose host asks the live enclave for a second PREPARE for the same
/// slot: the enclave certifies it, but under the next counter value, never under
/// the first one's. The replicas in the upper half of the ids get the twin in place
/// of the original; whoever fetches from its stream gets both. A replica that
/// consumes the stream in counter order sees the original first and rejects the
/// twin as a second PREPARE for the slot; one that did not (the
/// `no-continuity-check` mutant) votes for the twin, and the two halves commit
/// different batches.
struct Equivocate {
    me: ReplicaId,
    n: usize,
    tee: TeeHost,
    /// Its doubled PREPAREs: the original's counter value and the twin.
    twins: BTreeMap<u64, Prepare>,
    /// (recipient, counter) pairs that got the twin in place of the original.
    misled: BTreeSet<(ReplicaId, u64)>,
}

impl Equivocate {
    fn twin(&self, original: &Prepare) -> Option<Prepare> {
        conflicting_prepare(original, |scope, digest| {
            self.tee
                .call_live_enclave(self.me, |e| e.create_scoped_ui(scope, digest))?
                .ok()
        })
    }
}

impl Behaviour<Message> for Equivocate {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        _entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        if let (Message::Certified(Certified::Prepare(prepare)), NodeId::Replica(r)) =
            (&message, to)
        {
            let counter = prepare.ui.counter;
            if prepare.replica == self.me
                && self.twins.len() < TWINS
                && !self.twins.contains_key(&counter)
            {
                if let Some(twin) = self.twin(prepare) {
                    self.twins.insert(counter, twin);
                }
            }
            // The twin replaces the first copy only: retransmissions are honest.
            let upper_half = r.index() * 2 >= self.n;
            if let Some(twin) = self.twins.get(&counter) {
                if upper_half && self.misled.insert((r, counter)) {
                    let twin = Message::Certified(Certified::Prepare(twin.clone()));
                    return out.push(Outgoing::now(to, twin));
                }
            }
        }
        out.push(Outgoing::now(to, message));
    }

    fn incoming(
        &mut self,
        from: NodeId,
        message: &Message,
        _entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) -> bool {
        // A fetch from its stream gets the twins it asks for, besides the honest
        // answer (which has no message under their counter values).
        if let Message::StreamFetch(fetch) = message {
            for twin in self.twins.values().filter(|t| t.ui.counter >= fetch.from) {
                let twin = Message::Certified(Certified::Prepare(twin.clone()));
                out.push(Outgoing::now(from, twin));
            }
        }
        true
    }
}

/// Certified messages `skip-counter` sends before it skips a counter value.
const SKIP_AFTER: usize = 20;

/// A host that burns one counter value of the live enclave on a throwaway digest.
/// No message carries that value, so the replica's stream has a gap no fetch can
/// fill: receivers must hold everything after it (a primary is then replaced).
struct SkipCounter {
    me: ReplicaId,
    tee: TeeHost,
    /// Counter values of its certified messages seen going out.
    certified_seen: BTreeSet<u64>,
    skipped: bool,
}

impl Behaviour<Message> for SkipCounter {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        _entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        if let Message::Certified(certified) = &message {
            if certified.sender() == self.me && !self.skipped {
                self.certified_seen.insert(certified.counter());
                if self.certified_seen.len() >= SKIP_AFTER {
                    let burnt = Digest::of("diffuse/sim/skip-counter", &[]);
                    self.skipped = self
                        .tee
                        .call_live_enclave(self.me, |e| e.create_ui(&burnt))
                        .is_some_and(|ui| ui.is_ok());
                }
            }
        }
        out.push(Outgoing::now(to, message));
    }
}

/// A PREPARE for `original`'s slot with another batch (its last request dropped),
/// its UI from `certify`, given the scope and digest to certify.
fn conflicting_prepare(
    original: &Prepare,
    certify: impl FnOnce(Scope, &Digest) -> Option<Ui>,
) -> Option<Prepare> {
    let mut requests = original.batch.requests.clone().into_inner();
    requests.pop();
    let batch = Batch {
        requests: BoundedVec::truncating(requests),
    };
    let (replica, view, seq) = (original.replica, original.view, original.seq);
    let digest = Prepare::certified_digest(replica, view, seq, &batch.digest());
    let ui = certify(Scope::Slot(seq.0), &digest)?;
    Some(Prepare {
        replica,
        view,
        seq,
        batch,
        ui,
    })
}

/// Old certified messages kept for replays.
const REPLAY_MEMORY: usize = 32;

struct ForgeUi {
    me: ReplicaId,
    n: usize,
    seen: VecDeque<Certified>,
}

impl ForgeUi {
    fn other_replica(&self) -> ReplicaId {
        ReplicaId(((self.me.0 as usize + 1) % self.n) as u16)
    }

    /// The certified message with its content changed under the same UI.
    fn altered(&self, certified: &Certified) -> Certified {
        let mut forged = certified.clone();
        match &mut forged {
            Certified::Prepare(Prepare { seq, .. }) => *seq = seq.next(),
            Certified::Commit(c) => c.prepare.seq = c.prepare.seq.next(),
            Certified::Checkpoint(c) => c.state = diffuse_core::crypto::Digest::of("forged", b""),
            Certified::ViewChange(vc) => vc.stable.seq = Seq(vc.stable.seq.0 + 1),
            Certified::NewView(nv) => nv.base = Seq(nv.base.0 + 1),
            Certified::NewViewAck(ack) => ack.view = ack.view.next(),
        }
        forged
    }

    /// An out-of-stream message altered under its certificates (or signature), or
    /// `None` for messages that carry none.
    fn altered_out_of_stream(&self, message: &Message) -> Option<Message> {
        let mut forged = message.clone();
        match &mut forged {
            // The content stays (a receiver would ignore a copy of a PREPARE nobody
            // voted for before checking it): the certificate is what is forged.
            Message::PrepareCopy(p) => p.ui.certificate.0[0] ^= 1,
            Message::ViewChangeCopy(vc) => vc.ui.certificate.0[0] ^= 1,
            Message::NewViewProof(proof) => proof.new_view.ui.certificate.0[0] ^= 1,
            Message::Stable(cert) => cert.state = Digest::of("forged", b""),
            Message::RejoinReport(report) => {
                report.value.counter = report.value.counter.wrapping_add(1)
            }
            _ => return None,
        }
        Some(forged)
    }

    /// The certified message claiming another sender.
    fn misattributed(&self, certified: &Certified) -> Certified {
        let other = self.other_replica();
        let mut forged = certified.clone();
        match &mut forged {
            Certified::Prepare(p) => p.replica = other,
            Certified::Commit(c) => c.replica = other,
            Certified::Checkpoint(c) => c.replica = other,
            Certified::ViewChange(vc) => vc.replica = other,
            Certified::NewView(nv) => nv.replica = other,
            Certified::NewViewAck(ack) => ack.replica = other,
        }
        forged
    }
}

impl Behaviour<Message> for ForgeUi {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: Message,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<Message>>,
    ) {
        let Message::Certified(certified) = &message else {
            if entropy.below(2) == 0 {
                if let Some(lie) = self.altered_out_of_stream(&message) {
                    out.push(Outgoing::now(to, lie));
                }
            }
            out.push(Outgoing::now(to, message));
            return;
        };
        let lie = match entropy.below(5) {
            0 => Some(Message::Certified(self.altered(certified))),
            1 => Some(Message::Certified(self.misattributed(certified))),
            2 => self
                .seen
                .get(entropy.below(self.seen.len() as u64) as usize)
                .cloned()
                .map(Message::Certified),
            3 => match certified {
                // A "stable" certificate one interval ahead, made of its own vote.
                Certified::Checkpoint(c) => Some(Message::Stable(CheckpointCert {
                    seq: Seq(c.seq.0 * 2),
                    state: c.state,
                    votes: BoundedVec::truncating(vec![*c]),
                })),
                _ => None,
            },
            _ => None,
        };
        if let Some(lie) = lie {
            out.push(Outgoing::now(to, lie));
        }
        if self.seen.len() == REPLAY_MEMORY {
            self.seen.pop_front();
        }
        self.seen.push_back(certified.clone());
        // The honest message goes too (sometimes before the lie, sometimes after).
        out.push(Outgoing::now(to, message));
    }
}
