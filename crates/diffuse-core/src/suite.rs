//! How a protocol presents itself to the simulator and the runtime.
//!
//! A protocol crate implements [`ProtocolSuite`] once; the simulator, its checkers
//! and the command line then work with it unchanged. The suite also names the
//! protocol's own Byzantine [`Behaviour`]s (equivocation, forged certificates, ...)
//! and its mutants, deliberately broken variants that the checkers must catch.

use crate::app::Application;
use crate::codec::WireMessage;
use crate::config::ClusterKeys;
use crate::crypto::SecretKey;
use crate::ids::{ClientId, NodeId, ReplicaId};
use crate::protocol::{Client, Replica};
use crate::quorum::{QuorumError, QuorumSystem};
use std::any::Any;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A source of randomness handed in by the driver (the simulator's seeded RNG).
pub trait Entropy {
    /// The next 64 random bits.
    fn next_u64(&mut self) -> u64;

    /// A uniform value in `0..bound` (0 if `bound` is 0).
    fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        // Multiply-shift: unbiased enough for test scheduling, and deterministic.
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// True with probability `numerator / denominator`.
    fn chance(&mut self, numerator: u64, denominator: u64) -> bool {
        self.below(denominator) < numerator
    }
}

/// Everything a replica is built from.
#[derive(Clone)]
pub struct ReplicaSetup<O> {
    /// This replica's id.
    pub id: ReplicaId,
    /// Every member's public key.
    pub keys: Arc<ClusterKeys>,
    /// This replica's signing key.
    pub secret: SecretKey,
    /// Protocol options (timeouts, batching, mutant, ...).
    pub options: O,
}

/// Everything a client is built from.
#[derive(Clone)]
pub struct ClientSetup<O> {
    /// This client's id.
    pub id: ClientId,
    /// Every member's public key.
    pub keys: Arc<ClusterKeys>,
    /// This client's signing key.
    pub secret: SecretKey,
    /// Protocol options.
    pub options: O,
    /// The timestamp of the first request; a restarted client must start above any
    /// timestamp it used before (the runtime uses the wall clock).
    pub first_timestamp: u64,
}

/// A name and a one-line description, for `--help` and tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Named {
    /// Stable name used on the command line.
    pub name: &'static str,
    /// What it does.
    pub description: &'static str,
}

/// What a Byzantine replica sends instead of, or besides, an honest message.
#[derive(Debug, Clone)]
pub struct Outgoing<M> {
    /// Recipient.
    pub to: NodeId,
    /// A message, or raw bytes that need not decode.
    pub payload: Payload<M>,
    /// Extra delay before the network takes it.
    pub delay: Duration,
}

impl<M> Outgoing<M> {
    /// A message sent without extra delay.
    pub fn now(to: NodeId, message: M) -> Self {
        Self {
            to,
            payload: Payload::Message(message),
            delay: Duration::ZERO,
        }
    }
}

/// Outgoing content of a Byzantine replica.
#[derive(Debug, Clone)]
pub enum Payload<M> {
    /// A well-formed message (possibly lying).
    Message(M),
    /// Arbitrary bytes put on the wire as a frame.
    Raw(Vec<u8>),
}

/// A named Byzantine behaviour. The simulator runs the honest protocol on the faulty
/// replica and routes its traffic through the behaviour, which may drop, alter,
/// duplicate, delay or invent messages. It holds the replica's own key, so what it
/// signs is validly signed; it cannot sign for anyone else, and it cannot make the
/// network lie about the sender.
pub trait Behaviour<M>: Send {
    /// Rewrites one honest outgoing message into what is actually sent.
    fn outgoing(
        &mut self,
        to: NodeId,
        message: M,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<M>>,
    ) {
        let _ = entropy;
        out.push(Outgoing::now(to, message));
    }

    /// Sees an incoming message before the honest protocol does, may send more, and
    /// decides whether the honest protocol gets to see it (a faulty replica may ignore
    /// whatever it likes).
    fn incoming(
        &mut self,
        from: NodeId,
        message: &M,
        entropy: &mut dyn Entropy,
        out: &mut Vec<Outgoing<M>>,
    ) -> bool {
        let _ = (from, message, entropy, out);
        true
    }
}

/// Knowledge shared by all Byzantine replicas of one run: the adversary controls
/// every faulty replica, so their behaviours may collude. Each protocol keeps its
/// own state type in it.
#[derive(Clone)]
pub struct Coalition {
    members: Arc<Vec<ReplicaId>>,
    state: Arc<Mutex<Option<Box<dyn Any + Send>>>>,
}

impl Coalition {
    /// A coalition of the given faulty replicas.
    pub fn new(members: Vec<ReplicaId>) -> Self {
        Self {
            members: Arc::new(members),
            state: Arc::new(Mutex::new(None)),
        }
    }

    /// The faulty replicas.
    pub fn members(&self) -> &[ReplicaId] {
        &self.members
    }

    /// Runs `f` on the shared state of type `T` (created on first use).
    pub fn with<T: Default + Send + 'static, R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut guard = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.as_ref().is_none_or(|state| !state.is::<T>()) {
            *guard = Some(Box::new(T::default()));
        }
        let state = guard
            .as_mut()
            .and_then(|state| state.downcast_mut::<T>())
            .expect("state of type T was just created");
        f(state)
    }
}

/// A protocol as the simulator and runtime see it.
pub trait ProtocolSuite: 'static {
    /// The protocol's wire messages (replicas and clients).
    type Message: WireMessage;
    /// Replica timers.
    type Timer: Copy + Eq + Ord + std::fmt::Debug + Send + 'static;
    /// Client timers.
    type ClientTimer: Copy + Eq + Ord + std::fmt::Debug + Send + 'static;
    /// Protocol options.
    type Options: Clone + std::fmt::Debug + Send + Sync + 'static;
    /// The replica state machine.
    type Replica: Replica<Message = Self::Message, Timer = Self::Timer>;
    /// The client state machine.
    type Client: Client<Message = Self::Message, Timer = Self::ClientTimer>;

    /// The protocol's command-line name, e.g. `"pbft"`.
    const NAME: &'static str;

    /// Whether a crashed replica counts against `f` until it is back in: with a
    /// trusted counter, an unscheduled reboot locks the enclave until `f + 1` peers
    /// vouch for its counter (FastBFT §6.1 treats it as a crash failure). The
    /// simulator then crashes at most `f` minus the Byzantine count distinct replicas.
    const REBOOT_IS_A_FAULT: bool = false;

    /// Whether the protocol replaces a faulty primary (a view change). If not, the
    /// simulator keeps the first primary (replica 0) correct: never Byzantine, never
    /// crashed or restarted.
    const REPLACES_PRIMARY: bool = true;

    /// Whether a replica that restarts (crash or scheduled) takes part again. If
    /// not, the simulator offers no `crash` or `restart` mix and draws no crashes.
    const SURVIVES_RESTARTS: bool = true;

    /// Whether a client hears from every replica (its result needs replies from
    /// several). If not (FastBFT: one REPLY, from the primary), the runtime's client
    /// connects to a replica only once it has a message for it.
    const CLIENT_HEARS_FROM_EVERY_REPLICA: bool = true;

    /// Whether a message may depend on the writes before it surviving a crash. If
    /// so (PBFT, MinBFT), the runtime commits the writes durably before the
    /// message leaves. If not, messages leave at once and the writes become durable
    /// in the background, and always before a scheduled shutdown: FastBFT's
    /// enclave comes back **locked** after a crash and the replica rejoins without
    /// reading its disk, which serves only the restart after a scheduled shutdown.
    /// The simulator then hands a crashed replica the disk it had when it last
    /// started (the writes since may or may not have reached the disk).
    const MESSAGES_WAIT_FOR_WRITES: bool = true;

    /// The quorum system for `n` replicas.
    fn quorum(n: usize) -> Result<QuorumSystem, QuorumError>;

    /// Options suited to a real deployment.
    fn default_options() -> Self::Options;

    /// The default options with an operator's overrides: `section` is the
    /// `[options]` table of a node or client configuration file (untrusted input:
    /// unknown keys and out-of-range values are errors).
    fn configured_options(section: &toml::Table) -> Result<Self::Options, String>;

    /// Options suited to simulation, with knobs drawn from `entropy` so that many
    /// seeds explore many configurations.
    fn simulation_options(entropy: &mut dyn Entropy) -> Self::Options;

    /// The mutants this protocol can be built as.
    fn mutants() -> &'static [Named];

    /// Turns `options` into the mutant `name`; false if the name is unknown.
    fn apply_mutant(options: &mut Self::Options, name: &str) -> bool;

    /// Builds a replica.
    fn replica(setup: ReplicaSetup<Self::Options>, app: Box<dyn Application>) -> Self::Replica;

    /// Builds a client.
    fn client(setup: ClientSetup<Self::Options>) -> Self::Client;

    /// The protocol-specific Byzantine behaviours.
    fn behaviours() -> &'static [Named];

    /// Builds the behaviour `name` for a faulty replica of `coalition`.
    fn behaviour(
        name: &str,
        setup: &ReplicaSetup<Self::Options>,
        coalition: &Coalition,
    ) -> Option<Box<dyn Behaviour<Self::Message>>>;

    /// The protocol-specific Byzantine client behaviours (none by default). The
    /// simulator runs the honest client and routes what it sends through the
    /// behaviour ([`Behaviour::outgoing`]); a behaviour must still send each request
    /// the honest client sends, validly signed, at least once, so that the client's
    /// operations remain its own and the checkers judge them like any other's.
    fn client_behaviours() -> &'static [Named] {
        &[]
    }

    /// Builds the client behaviour `name` for the client of `setup`.
    fn client_behaviour(
        name: &str,
        setup: &ClientSetup<Self::Options>,
    ) -> Option<Box<dyn Behaviour<Self::Message>>> {
        let _ = (name, setup);
        None
    }
}
