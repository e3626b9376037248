//! A live PBFT replica fed arbitrary well-formed messages from arbitrary senders and
//! arbitrary timer firings: it must never panic and must keep its invariants.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use diffuse_apps::KvStore;
use diffuse_core::config::ClusterKeys;
use diffuse_core::crypto::SecretKey;
use diffuse_core::ids::{ClientId, NodeId, ReplicaId};
use diffuse_core::protocol::{Input, Recovered, Replica};
use diffuse_core::suite::ReplicaSetup;
use diffuse_pbft::{Message, PbftOptions, PbftReplica, Timer};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::time::Duration;

const TIMERS: [Timer; 7] = [
    Timer::Batch,
    Timer::Request,
    Timer::NewView,
    Timer::Status,
    Timer::StateTransfer,
    Timer::FetchBatch,
    Timer::CatchUp,
];

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let secrets: Vec<SecretKey> = (0..4u8).map(|i| SecretKey::from_seed([i + 1; 32])).collect();
    let client = SecretKey::from_seed([99; 32]);
    let keys = Arc::new(
        ClusterKeys::new(
            secrets.iter().map(SecretKey::public).collect(),
            [(ClientId(0), client.public())].into_iter().collect(),
        )
        .expect("valid cluster"),
    );
    let options = PbftOptions {
        checkpoint_interval: 2,
        window: 4,
        batch_delay: Duration::ZERO,
        ..PbftOptions::default()
    };
    let me = u.int_in_range(0..=3u16).unwrap_or(0);
    let mut replica = PbftReplica::new(
        ReplicaSetup {
            id: ReplicaId(me),
            keys,
            secret: secrets[usize::from(me)].clone(),
            options,
        },
        Box::new(KvStore::default()),
    );
    let _ = replica.handle(Input::Start(Recovered::default()));
    while !u.is_empty() {
        let input = match u.int_in_range(0..=7u8).unwrap_or(0) {
            0 => Input::Timer(TIMERS[u.int_in_range(0..=6usize).unwrap_or(0)]),
            _ => {
                let from = if u.arbitrary().unwrap_or(false) {
                    NodeId::Client(ClientId(u.int_in_range(0..=1).unwrap_or(0)))
                } else {
                    NodeId::Replica(ReplicaId(u.int_in_range(0..=4).unwrap_or(0)))
                };
                match Message::arbitrary(&mut u) {
                    Ok(message) => Input::Message { from, message },
                    Err(_) => break,
                }
            }
        };
        let _ = replica.handle(input);
        replica.check_invariants();
    }
});
