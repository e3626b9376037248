//! REJOIN message by message: a replica restarted without a scheduled shutdown
//! comes back with a locked enclave, asks its peers for counter reports, refuses a
//! forged one (and blames its sender), and unlocks only with `f + 1` genuine ones.

use diffuse_apps::KvStore;
use diffuse_core::config::ClusterKeys;
use diffuse_core::crypto::SecretKey;
use diffuse_core::ids::{NodeId, ReplicaId};
use diffuse_core::protocol::{Action, Actions, Input, Observation, Recovered, Replica};
use diffuse_core::suite::{ProtocolSuite, ReplicaSetup};
use diffuse_minbft::{Message, MinBft, MinBftReplica, Timer};
use std::collections::BTreeMap;
use std::sync::Arc;

const N: usize = 3;

fn setups() -> Vec<ReplicaSetup<diffuse_minbft::MinBftOptions>> {
    let secrets: Vec<SecretKey> = (0..N)
        .map(|i| SecretKey::from_seed([i as u8 + 1; 32]))
        .collect();
    let keys = Arc::new(
        ClusterKeys::new(
            secrets.iter().map(SecretKey::public).collect(),
            BTreeMap::new(),
        )
        .unwrap(),
    );
    let options = MinBft::default_options(); // one simulated machine per replica, shared
    secrets
        .into_iter()
        .enumerate()
        .map(|(i, secret)| ReplicaSetup {
            id: ReplicaId(i as u16),
            keys: keys.clone(),
            secret,
            options: options.clone(),
        })
        .collect()
}

fn start(setup: &ReplicaSetup<diffuse_minbft::MinBftOptions>) -> (MinBftReplica, Vec<Message>) {
    let mut replica = MinBft::replica(setup.clone(), Box::new(KvStore::default()));
    let actions = replica.handle(Input::Start(Recovered::default()));
    (replica, broadcasts(actions))
}

fn broadcasts(actions: Actions<Message, Timer>) -> Vec<Message> {
    actions
        .0
        .into_iter()
        .filter_map(|a| match a {
            Action::Broadcast { message } => Some(message),
            _ => None,
        })
        .collect()
}

fn deliver(
    replica: &mut MinBftReplica,
    from: usize,
    message: Message,
) -> Vec<Action<Message, Timer>> {
    replica
        .handle(Input::Message {
            from: NodeId::Replica(ReplicaId(from as u16)),
            message,
        })
        .0
}

/// The REJOIN report `reporter` sends back for `rejoin`.
fn report(reporter: &mut MinBftReplica, from: usize, rejoin: &Message) -> Message {
    deliver(reporter, from, rejoin.clone())
        .into_iter()
        .find_map(|a| match a {
            Action::Send { message, .. } if matches!(message, Message::RejoinReport(_)) => {
                Some(message)
            }
            _ => None,
        })
        .expect("a correct backup reports to a rejoining backup")
}

fn asks_to_rejoin(replica: &mut MinBftReplica) -> bool {
    let actions = replica.handle(Input::Timer(Timer::Status));
    broadcasts(actions)
        .iter()
        .any(|m| matches!(m, Message::Rejoin(_)))
}

#[test]
fn a_forged_rejoin_report_is_refused_and_blamed() {
    let setups = setups();
    let (mut r0, _) = start(&setups[0]);
    let (mut r1, _) = start(&setups[1]);
    let (first_r2, _) = start(&setups[2]);
    // An unscheduled reboot: the enclave's sealed state was spent at the first start.
    drop(first_r2);
    let (mut r2, sent) = start(&setups[2]);
    let rejoin = sent
        .into_iter()
        .find(|m| matches!(m, Message::Rejoin(_)))
        .expect("a rebooted replica asks for counter reports");

    let genuine_from_r1 = report(&mut r1, 2, &rejoin);
    let Message::RejoinReport(mut forged) = report(&mut r0, 2, &rejoin) else {
        unreachable!("report returns a RejoinReport");
    };
    forged.value.counter = forged.value.counter.wrapping_add(1); // no longer what r0's enclave signed

    let actions = deliver(&mut r2, 1, genuine_from_r1);
    assert!(asks_to_rejoin(&mut r2), "one report of the f + 1 needed");
    let actions_forged = deliver(&mut r2, 0, Message::RejoinReport(forged));
    let blamed = actions.into_iter().chain(actions_forged).any(|a| {
        matches!(
            a,
            Action::Observe(Observation::Fault { culprit: NodeId::Replica(ReplicaId(0)), kind })
                if kind == "bad-rejoin-report"
        )
    });
    assert!(blamed, "the forged report is blamed on its sender");
    assert!(
        asks_to_rejoin(&mut r2),
        "a forged report does not count towards the threshold"
    );

    // The genuine report of r0, which answers again after its next status tick.
    let genuine_from_r0 = report_again(&mut r0, &rejoin);
    deliver(&mut r2, 0, genuine_from_r0);
    assert!(
        !asks_to_rejoin(&mut r2),
        "f + 1 genuine reports unlock the enclave"
    );
}

/// A replica answers a peer's REJOIN once per status interval: the next tick lets
/// it answer again.
fn report_again(reporter: &mut MinBftReplica, rejoin: &Message) -> Message {
    let _ = reporter.handle(Input::Timer(Timer::Status));
    report(reporter, 2, rejoin)
}
