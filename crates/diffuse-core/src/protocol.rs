//! The sans-IO protocol interface shared by every protocol in Diffuse.
//!
//! A protocol instance is a deterministic state machine. Its driver (the simulator
//! or the node runtime) feeds it one [`Input`] at a time and carries out the
//! [`Actions`] it returns, **in order**:
//!
//! 1. [`Action::Persist`] must be durable before any later action of the same list
//!    is carried out. This is how "persist what you voted before you vote" is kept:
//!    a protocol puts the write before the message that depends on it.
//!    [`Action::PersistUnawaited`] writes are durable in order with the others but
//!    hold nothing back: only for writes whose loss the protocol survives by itself.
//! 2. [`Action::Send`] / [`Action::Multicast`] / [`Action::Broadcast`] go to
//!    authenticated channels. The
//!    driver guarantees that `from` in [`Input::Message`] is the true sender.
//! 3. [`Action::SetTimer`] replaces any running timer of the same kind;
//!    [`Action::CancelTimer`] stops it. A fired timer comes back as [`Input::Timer`].
//! 4. [`Action::Complete`] (clients) and [`Action::Observe`] report results and
//!    events; they change nothing in the protocol.
//!
//! The first input of a replica is always [`Input::Start`] with whatever it
//! persisted before (nothing, on first boot).

use crate::crypto::Digest;
use crate::ids::{NodeId, Seq, View};
use std::time::Duration;

/// What a protocol instance is fed.
#[derive(Debug, Clone)]
pub enum Input<M, T> {
    /// The instance starts, with the state it persisted before a crash or shutdown.
    Start(Recovered),
    /// A message from an authenticated peer.
    Message {
        /// The true sender, as authenticated by the transport.
        from: NodeId,
        /// The decoded message.
        message: M,
    },
    /// A timer set earlier has fired.
    Timer(T),
}

/// The durable state handed back to a replica on [`Input::Start`]: the key-value
/// pairs its [`Action::Persist`] writes left behind, in key order.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Key-value pairs in ascending key order.
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Recovered {
    /// Whether nothing was persisted (first boot).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value stored under `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.entries
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .ok()
            .map(|i| self.entries[i].1.as_slice())
    }

    /// The entries whose key starts with `prefix`, in key order.
    pub fn with_prefix<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        self.entries
            .iter()
            .filter(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }
}

/// One write to the replica's durable key-value store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Store `value` under `key`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// Remove `key`.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Remove every key in `start..end`.
    DeleteRange {
        /// First key removed.
        start: Vec<u8>,
        /// First key kept.
        end: Vec<u8>,
    },
}

/// Something worth knowing that happened inside a protocol: used by the simulator's
/// checkers, by metrics and by traces. Observations never change behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// A batch was executed at `seq`.
    Executed {
        /// Position in the total order.
        seq: Seq,
        /// Digest of the batch.
        batch: Digest,
        /// Number of requests executed (stale duplicates excluded).
        requests: usize,
    },
    /// A checkpoint was taken after executing `seq`.
    Checkpoint {
        /// The checkpoint's sequence number.
        seq: Seq,
        /// Digest of the replicated state (application and reply cache).
        state: Digest,
        /// The application's own digest.
        app: Digest,
    },
    /// A checkpoint became stable (certified by a quorum).
    StableCheckpoint {
        /// The checkpoint's sequence number.
        seq: Seq,
    },
    /// State transfer installed the certified state of checkpoint `seq`.
    StateTransferred {
        /// The checkpoint's sequence number.
        seq: Seq,
        /// Digest of the installed state.
        state: Digest,
        /// The application's digest after installing it.
        app: Digest,
    },
    /// The replica started a view change towards `view`.
    ViewChangeStarted {
        /// The view being changed to.
        view: View,
    },
    /// The replica installed `view` and operates normally in it.
    ViewInstalled {
        /// The new view.
        view: View,
    },
    /// The protocol switched modes (FastBFT's fallback and back).
    ModeChanged {
        /// The mode it is in now.
        mode: &'static str,
    },
    /// A peer sent something only a faulty node would send.
    Fault {
        /// The node to blame: always the authenticated sender.
        culprit: NodeId,
        /// A short stable name of the misbehaviour.
        kind: &'static str,
    },
}

/// One thing a protocol asks its driver to do.
#[derive(Debug, Clone)]
pub enum Action<M, T> {
    /// Send `message` to one node.
    Send {
        /// Recipient.
        to: NodeId,
        /// Message.
        message: M,
    },
    /// Send `message` to each of `to`: the same as one [`Action::Send`] per
    /// recipient, but the driver encodes it once (a primary's PREPARE to `f + 1`
    /// replicas of a large cluster is one batch, not `f + 1` copies of it).
    Multicast {
        /// Recipients, in the order sent.
        to: Vec<NodeId>,
        /// Message.
        message: M,
    },
    /// Send `message` to every replica except the sender.
    Broadcast {
        /// Message.
        message: M,
    },
    /// Start (or restart) a timer.
    SetTimer {
        /// Which timer.
        timer: T,
        /// Delay from now.
        after: Duration,
    },
    /// Stop a timer if it runs.
    CancelTimer {
        /// Which timer.
        timer: T,
    },
    /// Make these writes durable, atomically, before any later action.
    Persist(Vec<WriteOp>),
    /// Make these writes durable, atomically and in order with every other write,
    /// but without holding back the messages that follow them: a crash may lose
    /// them (and the writes after them) after later messages left. For writes whose
    /// loss the protocol survives by itself; PBFT sends its votes ahead of their
    /// slots' writes under a bound persisted with [`Action::Persist`]
    /// (`docs/protocols/pbft.md`, "Votes ahead of their writes").
    PersistUnawaited(Vec<WriteOp>),
    /// A client operation completed with this result (clients only).
    Complete {
        /// The request's timestamp.
        timestamp: u64,
        /// The result bytes agreed on by enough replicas.
        result: Vec<u8>,
    },
    /// An event for checkers, metrics and traces.
    Observe(Observation),
}

/// The ordered list of actions a protocol returns from one input.
#[derive(Debug, Clone)]
#[must_use = "actions must be carried out by the driver"]
pub struct Actions<M, T>(pub Vec<Action<M, T>>);

impl<M, T> Default for Actions<M, T> {
    fn default() -> Self {
        Actions(Vec::new())
    }
}

impl<M, T> Actions<M, T> {
    /// No actions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a send to one node.
    pub fn send(&mut self, to: impl Into<NodeId>, message: M) {
        self.0.push(Action::Send {
            to: to.into(),
            message,
        });
    }

    /// Appends one message for each of `to` (see [`Action::Multicast`]).
    pub fn multicast<N: Into<NodeId>>(&mut self, to: impl IntoIterator<Item = N>, message: M) {
        let to: Vec<NodeId> = to.into_iter().map(Into::into).collect();
        match to.len() {
            0 => {}
            1 => self.send(to[0], message),
            _ => self.0.push(Action::Multicast { to, message }),
        }
    }

    /// Appends a broadcast to all other replicas.
    pub fn broadcast(&mut self, message: M) {
        self.0.push(Action::Broadcast { message });
    }

    /// Appends a timer start.
    pub fn set_timer(&mut self, timer: T, after: Duration) {
        self.0.push(Action::SetTimer { timer, after });
    }

    /// Appends a timer cancellation.
    pub fn cancel_timer(&mut self, timer: T) {
        self.0.push(Action::CancelTimer { timer });
    }

    /// Appends durable writes (no-op if empty).
    pub fn persist(&mut self, writes: Vec<WriteOp>) {
        if !writes.is_empty() {
            self.0.push(Action::Persist(writes));
        }
    }

    /// Appends durable writes that later messages need not wait for (no-op if
    /// empty); see [`Action::PersistUnawaited`].
    pub fn persist_unawaited(&mut self, writes: Vec<WriteOp>) {
        if !writes.is_empty() {
            self.0.push(Action::PersistUnawaited(writes));
        }
    }

    /// Appends an observation.
    pub fn observe(&mut self, observation: Observation) {
        self.0.push(Action::Observe(observation));
    }

    /// Appends a fault observation.
    pub fn fault(&mut self, culprit: impl Into<NodeId>, kind: &'static str) {
        self.observe(Observation::Fault {
            culprit: culprit.into(),
            kind,
        });
    }

    /// Appends every action of `other`.
    pub fn extend(&mut self, other: Actions<M, T>) {
        self.0.extend(other.0);
    }

    /// Whether there are no actions.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The actions, in order.
    pub fn into_vec(self) -> Vec<Action<M, T>> {
        self.0
    }

    /// Iterates over the actions.
    pub fn iter(&self) -> std::slice::Iter<'_, Action<M, T>> {
        self.0.iter()
    }
}

/// A replica of some ordering protocol, driven through [`Input`]s.
pub trait Replica: Send {
    /// The protocol's message type.
    type Message: crate::codec::WireMessage;
    /// The protocol's closed set of timers.
    type Timer: Copy + Eq + Ord + std::fmt::Debug + Send + 'static;

    /// Feeds one input and returns what to do, in order.
    fn handle(
        &mut self,
        input: Input<Self::Message, Self::Timer>,
    ) -> Actions<Self::Message, Self::Timer>;

    /// The view the replica is in (or changing to). For metrics and traces.
    fn view(&self) -> View;

    /// The writes a scheduled shutdown makes durable before [`Replica::shutdown`],
    /// for a protocol that keeps what it needs after a restart in memory while it
    /// runs and writes it only when it stops (FastBFT: its disk serves only the
    /// restart after a scheduled shutdown, `docs/runtime.md`, "Storage"). The
    /// runtime and the simulator commit them after every earlier write.
    fn shutdown_writes(&mut self) -> Vec<WriteOp> {
        Vec::new()
    }

    /// A scheduled shutdown. The runtime calls it once, after the writes of every
    /// input handled so far are durable, and then drops the replica; a protocol
    /// with state outside its [`Action::Persist`] writes (MinBFT's enclave) seals
    /// it here, so that the next start resumes without help from its peers. A
    /// replica that is killed instead never gets the call.
    fn shutdown(&mut self) -> Result<(), ShutdownError> {
        Ok(())
    }

    /// Asserts the replica's internal invariants (panics if one is broken). The
    /// simulator calls it after every input, in every build; the runtime does not.
    fn check_invariants(&self) {}
}

/// Why a replica could not shut down cleanly: its next start recovers as after a
/// crash.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ShutdownError(pub String);

/// A client of some ordering protocol: one outstanding operation at a time.
pub trait Client: Send {
    /// The protocol's message type.
    type Message: crate::codec::WireMessage;
    /// The client's timers.
    type Timer: Copy + Eq + Ord + std::fmt::Debug + Send + 'static;

    /// Starts an operation. Fails if one is still outstanding.
    fn invoke(
        &mut self,
        operation: Vec<u8>,
    ) -> Result<Actions<Self::Message, Self::Timer>, InvokeError>;

    /// Starts an operation the caller knows only reads the state. A protocol
    /// with a read-only path may answer it without ordering it; the result is the
    /// same as `invoke`'s would be. The default orders it.
    fn invoke_read_only(
        &mut self,
        operation: Vec<u8>,
    ) -> Result<Actions<Self::Message, Self::Timer>, InvokeError> {
        self.invoke(operation)
    }

    /// Feeds a reply or a timer.
    fn handle(
        &mut self,
        input: Input<Self::Message, Self::Timer>,
    ) -> Actions<Self::Message, Self::Timer>;

    /// Whether an operation is outstanding.
    fn is_busy(&self) -> bool;
}

/// Why a client cannot start an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvokeError {
    /// The client already has an operation outstanding.
    #[error("the client already has an operation outstanding")]
    Busy,
    /// The operation is larger than the protocol accepts.
    #[error("operation of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// The operation's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ClientId, ReplicaId};

    #[test]
    fn a_multicast_is_one_action_for_many_and_a_send_for_one() {
        let mut out: Actions<&str, ()> = Actions::default();
        out.multicast(Vec::<NodeId>::new(), "nobody");
        assert!(out.0.is_empty(), "no recipient, no action");
        out.multicast([ReplicaId(3)], "one");
        out.multicast(
            [NodeId::Replica(ReplicaId(1)), NodeId::Client(ClientId(7))],
            "two",
        );
        match &out.0[..] {
            [
                Action::Send { to, message: "one" },
                Action::Multicast {
                    to: many,
                    message: "two",
                },
            ] => {
                assert_eq!(*to, NodeId::Replica(ReplicaId(3)));
                assert_eq!(
                    many,
                    &vec![NodeId::Replica(ReplicaId(1)), NodeId::Client(ClientId(7))]
                );
            }
            other => panic!("unexpected actions: {other:?}"),
        }
    }
}
