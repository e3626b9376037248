//! MinBFT-specific Byzantine behaviours for the simulator.
//!
//! Each runs on top of an honest replica and rewrites its traffic. The faulty host
//! cannot make its enclave certify two messages with one counter value, so its lies
//! are either certified messages it hides from some replicas (`withhold`) or
//! messages whose certificates do not match (`forge-ui`), which every receiver must
//! reject without being misled.

use crate::message::{Certified, CheckpointCert, Message, Prepare};
use diffuse_core::codec::BoundedVec;
use diffuse_core::ids::{NodeId, ReplicaId, Seq};
use diffuse_core::suite::{Behaviour, Coalition, Entropy, Named, Outgoing, ReplicaSetup};
use std::collections::VecDeque;

/// The MinBFT-specific behaviours.
pub const BEHAVIOURS: &[Named] = &[
    Named {
        name: "withhold",
        description: "sends its certified messages to one correct replica only (never answering the others' fetches), then falls silent: the view change must keep what that replica committed",
    },
    Named {
        name: "forge-ui",
        description: "alters certified messages under their UI, replays old ones, claims other senders, and sends forged checkpoint certificates",
    },
];

/// Builds the behaviour `name` for the replica of `setup`, one of `coalition`.
pub fn build<O>(
    name: &str,
    setup: &ReplicaSetup<O>,
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
