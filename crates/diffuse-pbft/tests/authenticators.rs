//! Client request authenticators: backups authenticate requests by their own MAC
//! entry, the primary by the signature; Byzantine clients that hand out bad MACs and
//! Byzantine primaries that forge requests can neither break agreement nor stall
//! correct clients. The argument is in `docs/protocols/pbft.md`, "Request
//! authentication".

mod support;

use diffuse_apps::{KvOp, KvResult};
use diffuse_core::codec::{Blob, BoundedVec};
use diffuse_core::crypto::{Mac, SecretKey, Signed};
use diffuse_core::ids::{ClientId, NodeId, ReplicaId, Seq, View};
use diffuse_pbft::Timer;
use diffuse_pbft::auth::RequestAuthenticator;
use diffuse_pbft::message::{Batch, Message, PrePrepare, Proposal, Request, RequestBody};
use support::{Cluster, client_secret, test_options};

fn replica(i: u16) -> NodeId {
    NodeId::Replica(ReplicaId(i))
}

fn body(client: u32, timestamp: u64, op: KvOp) -> RequestBody {
    RequestBody {
        client: ClientId(client),
        timestamp,
        operation: Blob::try_from_vec(op.encode()).unwrap(),
    }
}

/// A request with the genuine MACs of client `client` and a signature by `signer`
/// (the client's own key, or another one to make it invalid), with the MAC entries
/// of the replicas in `corrupt` flipped.
fn request(c: &Cluster, body: RequestBody, signer: &SecretKey, corrupt: &[usize]) -> Request {
    let client = client_secret(body.client.0 as usize);
    let mut entries = RequestAuthenticator::new(&client, &c.keys)
        .authenticate(&body)
        .to_vec();
    for &i in corrupt {
        entries[i].0[0] ^= 0x80;
    }
    Request {
        signed: Signed::sign(body, signer),
        authenticator: BoundedVec::truncating(entries),
    }
}

/// A PRE-PREPARE for `(view 0, seq 1)` signed by replica 0.
fn pre_prepare(c: &Cluster, requests: Vec<Request>) -> PrePrepare {
    let batch = Batch {
        requests: BoundedVec::truncating(requests),
    };
    PrePrepare {
        proposal: Signed::sign(
            Proposal {
                view: View(0),
                seq: Seq(1),
                digest: batch.digest(),
            },
            c.secret(0),
        ),
        batch,
    }
}

/// Request signatures verified by each live replica (a crashed one counts 0).
fn signature_checks(c: &Cluster) -> Vec<u64> {
    c.replicas
        .iter()
        .map(|r| r.as_ref().map_or(0, |r| r.request_signature_checks()))
        .collect()
}

/// With correct clients and a correct primary, only the primary verifies request
/// signatures: backups take every request on their own MAC entry.
#[test]
fn backups_verify_macs_and_only_the_primary_verifies_signatures() {
    let mut c = Cluster::new(4, 3, test_options());
    for round in 0..4 {
        for client in 0..3 {
            c.invoke(client, KvOp::put(format!("k{client}").as_bytes(), b"v"));
        }
        c.run();
        for client in 0..3 {
            assert_eq!(c.completed[client].len(), round + 1);
        }
    }
    assert_eq!(signature_checks(&c), vec![12, 0, 0, 0]);
    c.assert_agreement();
    assert!(c.faults.is_empty(), "{:?}", c.faults);
}

/// A Byzantine client gives the primary and one backup good MACs and the other two
/// backups bad ones, but signs correctly: those two fall back on the signature, and
/// the request executes everywhere without a view change.
#[test]
fn bad_macs_for_some_backups_fall_back_on_the_signature() {
    let mut c = Cluster::new(4, 2, test_options());
    let split = request(
        &c,
        body(1, 1, KvOp::put(b"split", b"1")),
        &client_secret(1),
        &[2, 3],
    );
    c.deliver(
        NodeId::Client(ClientId(1)),
        replica(0),
        Message::Request(split),
    );
    c.run();
    for i in 0..4 {
        assert_eq!(c.executed[i].len(), 1, "replica {i}");
    }
    assert_eq!(signature_checks(&c), vec![1, 0, 1, 1]);
    c.invoke(0, KvOp::get(b"split"));
    c.run();
    assert!(matches!(&c.completed[0][0].1, KvResult::Value(Some(v)) if &v[..] == b"1"));
    assert!(c.views_installed.iter().all(Vec::is_empty));
    c.assert_agreement();
    assert!(c.faults.is_empty(), "{:?}", c.faults);
}

/// A Byzantine client sends a request with good MACs for everyone but an invalid
/// signature, to every replica: the primary refuses to propose it, and no backup
/// holds it or starts its request timer, so it cannot push a correct primary out.
#[test]
fn a_bad_signature_is_refused_by_the_primary_and_never_timed_by_backups() {
    let mut c = Cluster::new(4, 2, test_options());
    let forged = request(&c, body(1, 1, KvOp::put(b"x", b"1")), c.secret(2), &[]);
    for r in 0..4 {
        c.deliver(
            NodeId::Client(ClientId(1)),
            replica(r),
            Message::Request(forged.clone()),
        );
    }
    c.run();
    assert_eq!(c.faults_of("bad-request"), 4);
    assert!(
        c.faults
            .iter()
            .all(|(_, culprit, _)| *culprit == NodeId::Client(ClientId(1)))
    );
    assert!(c.executed.iter().all(Vec::is_empty));
    assert!(
        c.timers.iter().all(|t| !t.contains(&Timer::Request)),
        "no replica times a request a correct primary would refuse"
    );
    c.invoke(0, KvOp::get(b"x"));
    c.run();
    assert!(matches!(&c.completed[0][0].1, KvResult::Value(None)));
    assert!(c.views_installed.iter().all(Vec::is_empty));
    c.assert_agreement();
}

/// A Byzantine primary puts a request of client 0 that the client never sent into
/// its PRE-PREPARE. It cannot compute any backup's MAC nor the client's signature:
/// every correct backup refuses the PRE-PREPARE, accuses the primary, and does not
/// prepare; the view changes and the forged request is never executed.
#[test]
fn a_request_forged_by_the_primary_is_rejected() {
    let mut c = Cluster::new(4, 1, test_options());
    let forged = Request {
        signed: Signed::sign(body(0, 1, KvOp::put(b"forged", b"1")), c.secret(0)),
        authenticator: BoundedVec::truncating(vec![Mac([7; 16]); 4]),
    };
    let pp = pre_prepare(&c, vec![forged]);
    c.crash(0); // the faulty primary says nothing more
    for r in 1..4 {
        c.deliver(replica(0), replica(r), Message::PrePrepare(pp.clone()));
    }
    c.run();
    assert_eq!(c.faults_of("bad-request-in-batch"), 3);
    assert!(
        c.faults
            .iter()
            .all(|(_, culprit, _)| *culprit == replica(0))
    );
    assert!(!c.delivered.contains_key("prepare"), "nobody prepared it");
    // Client 0's own first request (timestamp 1 too) goes through a view change.
    c.invoke(0, KvOp::get(b"forged"));
    c.run();
    c.client_retransmits_to_all(0);
    c.fire_all(Timer::Request);
    c.run();
    assert_eq!(c.completed[0].len(), 1);
    assert!(matches!(&c.completed[0][0].1, KvResult::Value(None)));
    for i in 1..4 {
        assert_eq!(c.views_installed[i], vec![View(1)], "replica {i}");
    }
    c.assert_agreement();
}

/// A Byzantine primary and a Byzantine client together: a request with an invalid
/// signature and a valid MAC for backup 1 only. Backup 1 accepts it (the MAC proves
/// the client sent it), backups 2 and 3 refuse; it cannot prepare. Backup 1 becomes
/// the next primary: it checks the signature of what it holds on a MAC alone before
/// proposing, drops the request, and the cluster serves correct clients without
/// further view changes.
#[test]
fn a_faulty_primary_and_client_cannot_split_the_backups_for_long() {
    let mut c = Cluster::new(4, 2, test_options());
    let split = request(
        &c,
        body(1, 1, KvOp::put(b"split", b"1")),
        c.secret(0),
        &[2, 3],
    );
    let pp = pre_prepare(&c, vec![split]);
    c.crash(0);
    for r in 1..4 {
        c.deliver(replica(0), replica(r), Message::PrePrepare(pp.clone()));
    }
    c.run();
    assert_eq!(c.faults_of("bad-request-in-batch"), 2, "{:?}", c.faults);
    assert_eq!(
        c.delivered.get("prepare"),
        Some(&3),
        "only backup 1 prepared"
    );
    assert_eq!(signature_checks(&c), vec![0, 0, 1, 1]);
    // Backup 1 times the request it accepted and moves to view 1 alone.
    c.fire_all(Timer::Request);
    c.run();
    // A correct client's request makes the others move too.
    c.invoke(0, KvOp::put(b"ok", b"1"));
    c.run();
    c.client_retransmits_to_all(0);
    c.fire_all(Timer::Request);
    c.run();
    assert_eq!(c.completed[0].len(), 1);
    for i in 1..4 {
        assert_eq!(c.views_installed[i], vec![View(1)], "replica {i}");
    }
    assert_eq!(
        c.replica(1).request_signature_checks(),
        2,
        "the new primary checked the held request and the client's"
    );
    // Nothing is left pending anywhere: no timer can push the new primary out.
    c.fire_all(Timer::Request);
    c.run();
    c.invoke(0, KvOp::get(b"split"));
    c.run();
    assert!(matches!(&c.completed[0][1].1, KvResult::Value(None)));
    for i in 1..4 {
        assert_eq!(c.views_installed[i], vec![View(1)], "replica {i}");
    }
    c.assert_agreement();
    assert!(
        c.faults
            .iter()
            .all(|(_, culprit, _)| *culprit == replica(0)),
        "{:?}",
        c.faults
    );
}

/// Options with a batching delay, so that the primary stages requests and checks
/// their signatures in one batch when the batch timer fires.
fn staging_options() -> diffuse_pbft::PbftOptions {
    diffuse_pbft::PbftOptions {
        batch_delay: std::time::Duration::from_millis(1),
        batch_max_requests: 8,
        ..test_options()
    }
}

/// The primary checks the signatures of the requests that arrived during the
/// batching delay in one batch. One of them has a bad signature: the batch fails, the
/// primary falls back on single checks, refuses that request alone (blaming its
/// client) and proposes the others, which execute everywhere.
#[test]
fn a_bad_signature_in_a_batch_costs_the_good_requests_nothing() {
    let mut c = Cluster::new(4, 4, staging_options());
    for client in 0..4u32 {
        let signer = if client == 2 {
            c.secret(3).clone()
        } else {
            client_secret(client as usize)
        };
        let r = request(
            &c,
            body(client, 1, KvOp::put(format!("k{client}").as_bytes(), b"v")),
            &signer,
            &[],
        );
        c.deliver(
            NodeId::Client(ClientId(client)),
            replica(0),
            Message::Request(r),
        );
    }
    // Staged, not checked yet: nothing proposed before the batch timer.
    assert_eq!(signature_checks(&c), vec![0, 0, 0, 0]);
    assert!(c.network.is_empty());
    assert!(c.fire(0, Timer::Batch));
    c.run();
    assert_eq!(signature_checks(&c), vec![4, 0, 0, 0]);
    assert_eq!(c.faults_of("bad-request"), 1);
    assert!(
        c.faults
            .iter()
            .all(|(_, culprit, _)| *culprit == NodeId::Client(ClientId(2)))
    );
    for i in 0..4 {
        assert_eq!(c.executed[i].len(), 1, "replica {i}: one batch");
    }
    // Client 2, caught once, is checked alone from now on; its next request (signed
    // correctly) and the others' still go through.
    for client in [0u32, 2] {
        let r = request(
            &c,
            body(client, 2, KvOp::put(b"again", b"v")),
            &client_secret(client as usize),
            &[],
        );
        c.deliver(
            NodeId::Client(ClientId(client)),
            replica(0),
            Message::Request(r),
        );
    }
    assert!(c.fire(0, Timer::Batch));
    c.run();
    assert_eq!(signature_checks(&c), vec![6, 0, 0, 0]);
    for i in 0..4 {
        assert_eq!(c.executed[i].len(), 2, "replica {i}: two batches");
    }
    c.assert_agreement();
}

/// Requests staged at the primary when it leaves its view are checked then, and
/// reach the next primary like any pending request.
#[test]
fn requests_staged_at_a_view_change_are_not_lost() {
    let mut c = Cluster::new(4, 3, staging_options());
    for client in 0..3 {
        c.invoke(client, KvOp::put(format!("k{client}").as_bytes(), b"v"));
    }
    c.run();
    // Only the primary has them, staged; client 2 retransmits to everyone, so the
    // backups time its request and, with no batch timer fired, change view.
    assert_eq!(signature_checks(&c), vec![0, 0, 0, 0]);
    c.client_retransmits_to_all(2);
    c.fire_all(Timer::Request);
    c.run();
    assert!(
        signature_checks(&c)[0] >= 3,
        "checked when the view was left"
    );
    for _ in 0..3 {
        c.fire_all(Timer::Batch);
        c.run();
    }
    for client in 0..3 {
        assert_eq!(c.completed[client].len(), 1, "client {client}");
    }
    for i in 0..4 {
        assert_eq!(c.views_installed[i], vec![View(1)], "replica {i}");
    }
    c.assert_agreement();
}
