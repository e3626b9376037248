//! Byzantine behaviours that need no knowledge of the protocol: they work on any
//! message type, or on raw bytes.

use diffuse_core::codec::{self, WireMessage};
use diffuse_core::ids::{NodeId, ReplicaId};
use diffuse_core::suite::{Behaviour, Entropy, Named, Outgoing, Payload};
use std::collections::VecDeque;
use std::time::Duration;

/// The protocol-independent behaviours.
pub const GENERIC_BEHAVIOURS: &[Named] = &[
    Named {
        name: "silent",
        description: "receives everything, sends nothing",
    },
    Named {
        name: "replay",
        description: "re-sends old messages it saw (its own and others') to random replicas",
    },
    Named {
        name: "garbage",
        description: "sends random bytes, truncated frames, bad versions and oversized frames",
    },
    Named {
        name: "selective-delay",
        description: "delays everything it sends to half of the replicas by up to 600 ms",
    },
];

/// Builds a generic behaviour.
pub fn build<M: WireMessage>(
    name: &str,
    n: usize,
    max_frame: usize,
    entropy: &mut dyn Entropy,
) -> Option<Box<dyn Behaviour<M>>> {
    match name {
        "silent" => Some(Box::new(Silent)),
        "replay" => Some(Box::new(Replay {
            n,
            seen: VecDeque::new(),
        })),
        "garbage" => Some(Box::new(Garbage { max_frame })),
        "selective-delay" => {
            let victims = (0..n)
                .filter(|_| entropy.chance(1, 2))
                .map(|i| ReplicaId(i as u16))
                .collect();
            Some(Box::new(SelectiveDelay { victims }))
        }
        _ => None,
    }
}

struct Silent;

impl<M: WireMessage> Behaviour<M> for Silent {
    fn outgoing(&mut self, _: NodeId, _: M, _: &mut dyn Entropy, _: &mut Vec<Outgoing<M>>) {}
}

/// Keeps the last messages it saw and sends them again later.
struct Replay<M> {
    n: usize,
    seen: VecDeque<M>,
}

const REPLAY_MEMORY: usize = 256;

impl<M: WireMessage> Replay<M> {
    fn remember(&mut self, message: &M) {
        if self.seen.len() == REPLAY_MEMORY {
            self.seen.pop_front();
        }
        self.seen.push_back(message.clone());
    }
}

impl<M: WireMessage> Behaviour<M> for Replay<M> {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: M,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<M>>,
    ) {
        self.remember(&message);
        out.push(Outgoing::now(to, message));
        if !self.seen.is_empty() && entropy.chance(1, 3) {
            let old = self.seen[entropy.below(self.seen.len() as u64) as usize].clone();
            let target = NodeId::Replica(ReplicaId(entropy.below(self.n as u64) as u16));
            out.push(Outgoing {
                to: target,
                payload: Payload::Message(old),
                delay: Duration::from_millis(entropy.below(50)),
            });
        }
    }

    fn incoming(
        &mut self,
        _: NodeId,
        message: &M,
        _: &mut dyn Entropy,
        _: &mut Vec<Outgoing<M>>,
    ) -> bool {
        self.remember(message);
        true
    }
}

/// Replaces half of its messages with bytes that do not decode.
struct Garbage {
    max_frame: usize,
}

impl<M: WireMessage> Behaviour<M> for Garbage {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: M,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<M>>,
    ) {
        if entropy.chance(1, 2) {
            out.push(Outgoing::now(to, message));
            return;
        }
        let random = |e: &mut dyn Entropy| {
            let len = e.below(300);
            (0..len).map(|_| e.next_u64() as u8).collect::<Vec<u8>>()
        };
        let bytes = match entropy.below(5) {
            0 => random(entropy),
            1 => {
                let mut frame = vec![codec::WIRE_VERSION];
                frame.extend(random(entropy));
                frame
            }
            2 => {
                let mut frame = codec::encode(&message);
                let keep = entropy.below(frame.len() as u64) as usize;
                frame.truncate(keep);
                frame
            }
            3 => {
                let mut frame = codec::encode(&message);
                frame[0] = codec::WIRE_VERSION.wrapping_add(1 + entropy.below(200) as u8);
                frame
            }
            _ if entropy.chance(1, 20) => vec![codec::WIRE_VERSION; self.max_frame + 1],
            _ => {
                let mut frame = codec::encode(&message);
                let at = entropy.below(frame.len() as u64) as usize;
                frame[at] ^= 1 << entropy.below(8);
                frame
            }
        };
        out.push(Outgoing {
            to,
            payload: Payload::Raw(bytes),
            delay: Duration::ZERO,
        });
    }
}

/// Delays everything sent to a fixed set of victims.
struct SelectiveDelay {
    victims: Vec<ReplicaId>,
}

impl<M: WireMessage> Behaviour<M> for SelectiveDelay {
    fn outgoing(
        &mut self,
        to: NodeId,
        message: M,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<M>>,
    ) {
        let victim = to.replica().is_some_and(|r| self.victims.contains(&r));
        let delay = if victim {
            Duration::from_millis(100 + entropy.below(500))
        } else {
            Duration::ZERO
        };
        out.push(Outgoing {
            to,
            payload: Payload::Message(message),
            delay,
        });
    }
}
