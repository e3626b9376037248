//! The client library of Diffuse: use a running cluster from async Rust.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use diffuse_client::{ClientConfig, KvClient};
//!
//! // A client configuration written by `diffuse testnet`.
//! let settings = ClientConfig::load("testnet/client-0.toml".as_ref())?;
//! let mut kv = KvClient::connect(settings).await?;
//! kv.put(b"greeting", b"hello").await?;
//! assert_eq!(kv.get(b"greeting").await?, Some(b"hello".to_vec()));
//! let (swapped, _previous) = kv.cas(b"greeting", Some(b"hello"), b"bye").await?;
//! assert!(swapped);
//! # Ok(()) }
//! ```
//!
//! * [`KvClient`]: typed operations on the replicated key-value store.
//! * [`AnyClient`]: raw operations (bytes in, agreed bytes out) for any application,
//!   on whichever protocol the configuration names.
//! * [`Client`]: the same, for a protocol chosen at compile time.
//!
//! A client has one operation outstanding at a time; run several for concurrency.
//! It signs each request, sends it to the replicas over Noise-authenticated TCP,
//! retransmits on its own timer and accepts a result only when f+1 replicas agree.
//! An operation that gets no such result within the configured `timeout_ms` fails
//! with [`ClientError::Timeout`]; it may still take effect.
//!
//! * [`AnyClientHost`] / [`ClientHost`]: one connection per replica for many clients
//!   of one process. Clients registered with the same key in the cluster file can
//!   share it ([`KvClient::hosted`], [`Client::hosted`]): their requests and replies
//!   then travel many per frame burst and system call, which on one machine
//!   doubled the throughput of 128 clients (`docs/runtime.md`, "Client hosts").
//!
//! The wire protocol is documented in `docs/protocols/pbft.md` and
//! `docs/runtime.md`, for clients in other languages.

pub use diffuse_apps::{KvOp, KvResult};
pub use diffuse_node::client::{
    AnyClient, AnyClientHost, Client, ClientError, ClientHost, KvClient,
};
pub use diffuse_node::config::{ClientConfig, ClientSettings, SettingsError};
