//! Per-sender streams of certified messages: the receiver side of USIG continuity.
//!
//! A receiver processes each sender's certified messages in counter order, with no
//! gaps. A message above a gap is held back (a bounded number per sender; beyond
//! that the newest are dropped and fetched again later). A message next in line
//! that the replica cannot use yet stays at the head and stalls its stream.

use crate::message::Certified;
use diffuse_core::ids::ReplicaId;
use std::collections::BTreeMap;

/// What happened to an offered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Already consumed (a counter value below the next expected one).
    Duplicate,
    /// Kept, in line or behind a gap.
    Held,
    /// Not kept: the sender's hold-back queue is full.
    Dropped,
}

#[derive(Debug, Default)]
struct Stream {
    /// The next counter value this receiver consumes from the sender.
    next: u64,
    held: BTreeMap<u64, Certified>,
}

/// The streams of every sender.
#[derive(Debug)]
pub struct Streams {
    streams: BTreeMap<ReplicaId, Stream>,
    capacity: usize,
}

impl Streams {
    /// Streams for `senders`, each expecting counter `first` next, holding at most
    /// `capacity` messages per sender.
    pub fn new(senders: impl IntoIterator<Item = ReplicaId>, first: u64, capacity: usize) -> Self {
        Streams {
            streams: senders
                .into_iter()
                .map(|r| {
                    (
                        r,
                        Stream {
                            next: first,
                            held: BTreeMap::new(),
                        },
                    )
                })
                .collect(),
            capacity,
        }
    }

    /// Keeps `message` (its UI already verified) until it is next in line.
    pub fn offer(&mut self, message: Certified) -> Offered {
        let Some(stream) = self.streams.get_mut(&message.sender()) else {
            return Offered::Dropped;
        };
        let counter = message.counter();
        if counter < stream.next || stream.held.contains_key(&counter) {
            return Offered::Duplicate;
        }
        if stream.held.len() >= self.capacity {
            // Keep the messages closest to the head: they unblock the stream first.
            match stream.held.last_key_value() {
                Some((&highest, _)) if highest > counter => {
                    stream.held.remove(&highest);
                }
                _ => return Offered::Dropped,
            }
        }
        stream.held.insert(counter, message);
        Offered::Held
    }

    /// The sender's next message, if it has arrived.
    pub fn peek(&self, sender: ReplicaId) -> Option<&Certified> {
        let stream = self.streams.get(&sender)?;
        stream.held.get(&stream.next)
    }

    /// Consumes the sender's next message.
    pub fn pop(&mut self, sender: ReplicaId) -> Option<Certified> {
        let stream = self.streams.get_mut(&sender)?;
        let message = stream.held.remove(&stream.next)?;
        stream.next += 1;
        Some(message)
    }

    /// The next counter expected from `sender`.
    pub fn next_expected(&self, sender: ReplicaId) -> Option<u64> {
        self.streams.get(&sender).map(|s| s.next)
    }

    /// If `sender`'s next message is missing, continues the stream at the first held
    /// message that `is_anchor` accepts (dropping what is held below it).
    pub fn skip_to(&mut self, sender: ReplicaId, is_anchor: impl Fn(&Certified) -> bool) {
        let Some(stream) = self.streams.get_mut(&sender) else {
            return;
        };
        if stream.held.contains_key(&stream.next) {
            return;
        }
        let Some(anchor) = stream
            .held
            .iter()
            .find(|(_, m)| is_anchor(m))
            .map(|(c, _)| *c)
        else {
            return;
        };
        stream.held = stream.held.split_off(&anchor);
        stream.next = anchor;
    }

    /// Senders whose next message is missing while later ones wait: the counter to
    /// fetch from, per sender.
    pub fn gaps(&self) -> impl Iterator<Item = (ReplicaId, u64)> + '_ {
        self.streams.iter().filter_map(|(r, s)| {
            (!s.held.is_empty() && !s.held.contains_key(&s.next)).then_some((*r, s.next))
        })
    }

    /// The senders.
    pub fn senders(&self) -> impl Iterator<Item = ReplicaId> + '_ {
        self.streams.keys().copied()
    }

    /// Messages held for `sender`.
    pub fn held(&self, sender: ReplicaId) -> usize {
        self.streams.get(&sender).map_or(0, |s| s.held.len())
    }

    /// The per-sender bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Checkpoint;
    use diffuse_core::crypto::{Digest, SecretKey};
    use diffuse_core::ids::Seq;
    use diffuse_tee::Ui;

    fn message(sender: u16, counter: u64) -> Certified {
        let key = SecretKey::from_seed([1; 32]);
        Certified::Checkpoint(Checkpoint {
            replica: ReplicaId(sender),
            seq: Seq(counter),
            state: Digest::of("t", b"s"),
            ui: Ui {
                counter,
                certificate: key.sign("t", b"x"),
            },
        })
    }

    #[test]
    fn messages_come_out_in_counter_order_without_gaps() {
        let mut streams = Streams::new([ReplicaId(0), ReplicaId(1)], 1, 8);
        assert_eq!(streams.offer(message(0, 2)), Offered::Held);
        assert!(streams.peek(ReplicaId(0)).is_none(), "1 is missing");
        assert_eq!(streams.gaps().collect::<Vec<_>>(), vec![(ReplicaId(0), 1)]);
        streams.offer(message(0, 1));
        assert_eq!(streams.pop(ReplicaId(0)).unwrap().counter(), 1);
        assert_eq!(streams.pop(ReplicaId(0)).unwrap().counter(), 2);
        assert!(streams.pop(ReplicaId(0)).is_none());
        assert_eq!(streams.offer(message(0, 2)), Offered::Duplicate);
        assert_eq!(
            streams.offer(message(7, 1)),
            Offered::Dropped,
            "not a sender"
        );
    }

    #[test]
    fn a_full_queue_keeps_the_lowest_counters() {
        let mut streams = Streams::new([ReplicaId(0)], 1, 2);
        streams.offer(message(0, 5));
        streams.offer(message(0, 6));
        assert_eq!(streams.offer(message(0, 9)), Offered::Dropped);
        assert_eq!(streams.offer(message(0, 1)), Offered::Held);
        assert_eq!(streams.held(ReplicaId(0)), 2);
        assert_eq!(streams.pop(ReplicaId(0)).unwrap().counter(), 1);
        assert!(streams.pop(ReplicaId(0)).is_none());
    }
}
