//! The client library: invoke operations on a running cluster from async Rust.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use diffuse_node::client::KvClient;
//! use diffuse_node::config::ClientConfig;
//!
//! let settings = ClientConfig::load("testnet/client-0.toml".as_ref())?;
//! let mut kv = KvClient::connect(settings).await?;
//! kv.put(b"greeting", b"hello").await?;
//! assert_eq!(kv.get(b"greeting").await?, Some(b"hello".to_vec()));
//! # Ok(()) }
//! ```
//!
//! A client has one operation outstanding at a time (run several clients for
//! concurrency). The protocol's client machine does the work: it signs requests,
//! retransmits to every replica on its own timer, and accepts a result only when
//! f+1 replicas agree. This layer adds the connections, real timers and an overall
//! deadline per operation.
//!
//! A process that runs many clients can host them on one connection per replica
//! ([`ClientHost`], [`KvClient::hosted`]) if they share a key: their requests and
//! replies then travel together, many per system call, instead of each client
//! holding connections of its own (`docs/runtime.md`, "Client hosts").

use crate::config::ClientSettings;
use crate::host::{Hosted, Listening};
use crate::inbox::Inbox;
use crate::metrics::NodeMetrics;
use crate::timers::Timers;
use crate::transport::{Limits, Recipients, Transport};
use diffuse_apps::kv::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use diffuse_apps::{KvOp, KvResult};
use diffuse_core::ids::NodeId;
use diffuse_core::protocol::{Action, Actions, Client as _, Input, InvokeError};
use diffuse_core::suite::{ClientSetup, ProtocolSuite};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub use crate::host::{AnyClientHost, ClientHost};

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No f+1 matching replies arrived in time. The operation may still execute.
    #[error("no result within {0:?} (the operation may still take effect)")]
    Timeout(Duration),
    /// The operation exceeds a size limit.
    #[error("{0}")]
    Invalid(String),
    /// The configuration names a protocol this build does not have.
    #[error("unknown protocol `{0}` (available: pbft, minbft, fastbft)")]
    UnknownProtocol(String),
    /// The replicas agreed on a result this client cannot decode.
    #[error("undecodable result: {0}")]
    BadResult(String),
}

impl From<InvokeError> for ClientError {
    fn from(error: InvokeError) -> Self {
        ClientError::Invalid(error.to_string())
    }
}

/// Where a client's replies come from: its own connections, or its host's.
enum Replies<M> {
    Own(Inbox<M>),
    Hosted(Hosted<M>),
}

impl<M> Replies<M> {
    async fn recv(&mut self) -> Option<(NodeId, M)> {
        match self {
            Replies::Own(inbox) => inbox.recv().await.map(|i| (i.from, i.message)),
            Replies::Hosted(hosted) => hosted.recv().await,
        }
    }

    /// While the guard lives, replies for this client are taken (a hosted client
    /// gets none between operations).
    fn listen(&mut self) -> Option<Listening> {
        match self {
            Replies::Own(_) => None,
            Replies::Hosted(hosted) => Some(hosted.listen()),
        }
    }

    /// After an operation: a hosted client drops the late replies it was handed,
    /// so that they hold none of the host's budget while it is idle.
    fn finish(&mut self) {
        if let Replies::Hosted(hosted) = self {
            hosted.drain();
        }
    }
}

/// A client of a cluster running protocol `S`.
pub struct Client<S: ProtocolSuite> {
    settings: ClientSettings,
    options: S::Options,
    machine: S::Client,
    transport: Arc<Transport<S::Message>>,
    inbox: Replies<S::Message>,
    timers: Timers<S::ClientTimer>,
    /// The first timestamp of the current machine, and operations it started.
    first_timestamp: u64,
    invoked: u64,
}

/// The first timestamp of a replacement machine: above every timestamp the old one
/// may have used (one per operation), and at least the wall clock.
fn next_first_timestamp(previous_first: u64, invoked: u64) -> u64 {
    wall_clock_nanos().max(previous_first.saturating_add(invoked).saturating_add(1))
}

fn wall_clock_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

impl<S: ProtocolSuite> Client<S> {
    /// Starts connecting to every replica (connections come up in the background
    /// and are re-established when they fail).
    pub async fn connect(settings: ClientSettings, options: S::Options) -> Self {
        Self::own(settings, options)
    }

    /// A client with connections of its own.
    fn own(settings: ClientSettings, options: S::Options) -> Self {
        let (transport, inbox) = Transport::client(
            settings.id,
            settings.secret.clone(),
            settings.cluster.clone(),
            Limits {
                dial_on_demand: !S::CLIENT_HEARS_FROM_EVERY_REPLICA,
                ..Limits::client()
            },
            Arc::new(NodeMetrics::default()),
        );
        Self::with(settings, options, Arc::new(transport), Replies::Own(inbox))
    }

    /// A client on `host`'s connections. Its key must be the host's: the replicas
    /// take a connection's messages only for the clients of its key.
    pub fn hosted(
        host: &ClientHost<S>,
        settings: ClientSettings,
        options: S::Options,
    ) -> Result<Self, ClientError> {
        if settings.secret.public() != *host.key() {
            return Err(ClientError::Invalid(format!(
                "client {} has another key than its host's",
                settings.id.0
            )));
        }
        let replies = Replies::Hosted(host.attach(settings.id));
        Ok(Self::with(settings, options, host.transport(), replies))
    }

    fn with(
        settings: ClientSettings,
        options: S::Options,
        transport: Arc<Transport<S::Message>>,
        inbox: Replies<S::Message>,
    ) -> Self {
        let first_timestamp = wall_clock_nanos();
        let machine = Self::machine(&settings, &options, first_timestamp);
        Client {
            settings,
            options,
            machine,
            first_timestamp,
            invoked: 0,
            transport,
            inbox,
            timers: Timers::default(),
        }
    }

    /// A fresh protocol client whose timestamps start at the wall clock, above any
    /// this identity used before (also across restarts).
    fn machine(settings: &ClientSettings, options: &S::Options, first_timestamp: u64) -> S::Client {
        S::client(ClientSetup {
            id: settings.id,
            keys: settings.cluster.keys.clone(),
            secret: settings.secret.clone(),
            options: options.clone(),
            first_timestamp,
        })
    }

    /// Runs `operation` through the cluster and returns the agreed result.
    pub async fn invoke(&mut self, operation: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        self.run(operation, false).await
    }

    /// Runs an operation that only reads the state: on the protocol's read-only
    /// path if it has one (PBFT's), ordered otherwise.
    pub async fn invoke_read_only(&mut self, operation: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        self.run(operation, true).await
    }

    async fn run(&mut self, operation: Vec<u8>, read_only: bool) -> Result<Vec<u8>, ClientError> {
        let listening = self.inbox.listen();
        let outcome = self.run_operation(operation, read_only).await;
        drop(listening);
        self.inbox.finish();
        outcome
    }

    async fn run_operation(
        &mut self,
        operation: Vec<u8>,
        read_only: bool,
    ) -> Result<Vec<u8>, ClientError> {
        if self.machine.is_busy() {
            // An earlier `invoke` was dropped before it finished: abandon it.
            self.abandon();
        }
        let deadline = Instant::now() + self.settings.timeout;
        let actions = if read_only {
            self.machine.invoke_read_only(operation)?
        } else {
            self.machine.invoke(operation)?
        };
        self.invoked += 1;
        if let Some(result) = self.carry_out(actions) {
            return Ok(result);
        }
        loop {
            let wake = self
                .timers
                .next_deadline()
                .map_or(deadline, |timer| timer.min(deadline));
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= deadline {
                        self.abandon();
                        return Err(ClientError::Timeout(self.settings.timeout));
                    }
                    for timer in self.timers.expired(Instant::now()) {
                        let actions = self.machine.handle(Input::Timer(timer));
                        if let Some(result) = self.carry_out(actions) {
                            return Ok(result);
                        }
                    }
                }
                inbound = self.inbox.recv() => {
                    let Some((from, message)) = inbound else {
                        return Err(ClientError::Timeout(self.settings.timeout));
                    };
                    let actions = self.machine.handle(Input::Message { from, message });
                    if let Some(result) = self.carry_out(actions) {
                        return Ok(result);
                    }
                }
            }
        }
    }

    /// Gives up on the outstanding operation: a new machine with higher timestamps,
    /// so that a late result cannot be mistaken for the next operation's.
    fn abandon(&mut self) {
        self.first_timestamp = next_first_timestamp(self.first_timestamp, self.invoked);
        self.invoked = 0;
        self.machine = Self::machine(&self.settings, &self.options, self.first_timestamp);
        self.timers = Timers::default();
    }

    fn carry_out(&mut self, actions: Actions<S::Message, S::ClientTimer>) -> Option<Vec<u8>> {
        let mut result = None;
        for action in actions.into_vec() {
            match action {
                Action::Send { to, message } => {
                    self.transport.send(to, &message);
                }
                Action::Multicast { to, message } => {
                    self.transport
                        .send_all([(&Recipients::These(to), &message)]);
                }
                Action::Broadcast { message } => self.transport.broadcast(&message),
                Action::SetTimer { timer, after } => self.timers.set(timer, after, Instant::now()),
                Action::CancelTimer { timer } => self.timers.cancel(timer),
                Action::Complete { result: bytes, .. } => result = Some(bytes),
                Action::Persist(_) | Action::PersistUnawaited(_) | Action::Observe(_) => {}
            }
        }
        if result.is_some() {
            self.timers = Timers::default();
        }
        result
    }
}

/// A client of whichever protocol the configuration names.
pub enum AnyClient {
    /// PBFT.
    Pbft(Client<diffuse_pbft::Pbft>),
    /// MinBFT.
    MinBft(Client<diffuse_minbft::MinBft>),
    /// FastBFT.
    FastBft(Client<diffuse_fastbft::FastBft>),
}

impl AnyClient {
    /// Connects with the protocol's default options.
    pub async fn connect(settings: ClientSettings) -> Result<AnyClient, ClientError> {
        Self::build(settings, None)
    }

    /// A client on `host`'s connections (see [`Client::hosted`]).
    pub fn hosted(
        host: &AnyClientHost,
        settings: ClientSettings,
    ) -> Result<AnyClient, ClientError> {
        Self::build(settings, Some(host))
    }

    fn build(
        settings: ClientSettings,
        host: Option<&AnyClientHost>,
    ) -> Result<AnyClient, ClientError> {
        use diffuse_core::suite::ProtocolSuite as _;
        let mismatch = || ClientError::Invalid("the host runs another protocol".into());
        match settings.protocol.as_str() {
            "pbft" => {
                let options = diffuse_pbft::Pbft::configured_options(&settings.options)
                    .map_err(ClientError::Invalid)?;
                Ok(AnyClient::Pbft(match host {
                    None => Client::own(settings, options),
                    Some(AnyClientHost::Pbft(host)) => Client::hosted(host, settings, options)?,
                    Some(_) => return Err(mismatch()),
                }))
            }
            "minbft" => {
                let options = diffuse_minbft::MinBft::configured_options(&settings.options)
                    .map_err(ClientError::Invalid)?;
                Ok(AnyClient::MinBft(match host {
                    None => Client::own(settings, options),
                    Some(AnyClientHost::MinBft(host)) => Client::hosted(host, settings, options)?,
                    Some(_) => return Err(mismatch()),
                }))
            }
            "fastbft" => {
                let mut options = diffuse_fastbft::FastBft::configured_options(&settings.options)
                    .map_err(ClientError::Invalid)?;
                let Some(enclaves_file) = &settings.enclaves_file else {
                    return Err(ClientError::Invalid(
                        "a FastBFT client needs `enclaves_file` (the attested enclave list)".into(),
                    ));
                };
                let keys =
                    crate::enclaves::EnclavesFile::load_keys(enclaves_file, settings.cluster.n())
                        .map_err(|e| ClientError::Invalid(e.to_string()))?;
                options.tee = diffuse_minbft::TeeHost::attested(keys);
                Ok(AnyClient::FastBft(match host {
                    None => Client::own(settings, options),
                    Some(AnyClientHost::FastBft(host)) => Client::hosted(host, settings, options)?,
                    Some(_) => return Err(mismatch()),
                }))
            }
            other => Err(ClientError::UnknownProtocol(other.to_string())),
        }
    }

    /// Runs `operation` and returns the agreed result.
    pub async fn invoke(&mut self, operation: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        match self {
            AnyClient::Pbft(client) => client.invoke(operation).await,
            AnyClient::MinBft(client) => client.invoke(operation).await,
            AnyClient::FastBft(client) => client.invoke(operation).await,
        }
    }

    /// Runs an operation that only reads (see [`Client::invoke_read_only`]).
    pub async fn invoke_read_only(&mut self, operation: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        match self {
            AnyClient::Pbft(client) => client.invoke_read_only(operation).await,
            AnyClient::MinBft(client) => client.invoke_read_only(operation).await,
            AnyClient::FastBft(client) => client.invoke_read_only(operation).await,
        }
    }
}

/// A typed client of the replicated key-value store.
pub struct KvClient {
    inner: AnyClient,
}

fn check(what: &str, bytes: &[u8], limit: usize) -> Result<(), ClientError> {
    if bytes.len() > limit {
        return Err(ClientError::Invalid(format!(
            "{what} of {} bytes exceeds the {limit}-byte limit",
            bytes.len()
        )));
    }
    Ok(())
}

impl KvClient {
    /// Connects to the cluster named by `settings`.
    pub async fn connect(settings: ClientSettings) -> Result<KvClient, ClientError> {
        Ok(KvClient {
            inner: AnyClient::connect(settings).await?,
        })
    }

    /// A client of `settings` on `host`'s connections; its key must be the host's
    /// (see [`Client::hosted`]).
    pub fn hosted(host: &AnyClientHost, settings: ClientSettings) -> Result<KvClient, ClientError> {
        Ok(KvClient {
            inner: AnyClient::hosted(host, settings)?,
        })
    }

    /// Runs any operation and returns its typed result.
    pub async fn execute(&mut self, op: &KvOp) -> Result<KvResult, ClientError> {
        let bytes = if op.is_read_only() {
            self.inner.invoke_read_only(op.encode()).await?
        } else {
            self.inner.invoke(op.encode()).await?
        };
        match KvResult::decode(&bytes).map_err(|e| ClientError::BadResult(e.to_string()))? {
            KvResult::Error(message) => Err(ClientError::Invalid(
                String::from_utf8_lossy(&message).into_owned(),
            )),
            result => Ok(result),
        }
    }

    /// Stores `value` under `key`.
    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        check("key", key, MAX_KEY_BYTES)?;
        check("value", value, MAX_VALUE_BYTES)?;
        self.execute(&KvOp::put(key, value)).await.map(|_| ())
    }

    /// Reads `key`.
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        check("key", key, MAX_KEY_BYTES)?;
        match self.execute(&KvOp::get(key)).await? {
            KvResult::Value(value) => Ok(value.map(|v| v.to_vec())),
            other => Err(ClientError::BadResult(format!("{other:?} for a get"))),
        }
    }

    /// Stores `new` if `key` holds `expected` (`None`: absent). Returns whether it
    /// did, and the value found.
    pub async fn cas(
        &mut self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<(bool, Option<Vec<u8>>), ClientError> {
        check("key", key, MAX_KEY_BYTES)?;
        check("value", new, MAX_VALUE_BYTES)?;
        if let Some(expected) = expected {
            check("expected value", expected, MAX_VALUE_BYTES)?;
        }
        match self.execute(&KvOp::cas(key, expected, new)).await? {
            KvResult::Swapped { swapped, previous } => Ok((swapped, previous.map(|v| v.to_vec()))),
            other => Err(ClientError::BadResult(format!("{other:?} for a cas"))),
        }
    }

    /// Removes `key`; returns whether it existed.
    pub async fn delete(&mut self, key: &[u8]) -> Result<bool, ClientError> {
        check("key", key, MAX_KEY_BYTES)?;
        match self.execute(&KvOp::delete(key)).await? {
            KvResult::Deleted { existed } => Ok(existed),
            other => Err(ClientError::BadResult(format!("{other:?} for a delete"))),
        }
    }
}
