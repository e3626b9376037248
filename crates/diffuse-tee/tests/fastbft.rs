//! FastBFT's enclave functions (Fig. 3): shares XOR up to the secret, children
//! hashes check the aggregates, and every hostile input is refused with a typed
//! error.

use diffuse_core::crypto::{Digest, PublicKey, Signed};
use diffuse_tee::fastbft::{MAX_PREPROCESSING, Preprocessed};
use diffuse_tee::{
    CounterCertificate, FastBftComponent, FastBftError, Platform, Share, SoftwareEnclave,
    SoftwarePlatform, Tree, TrustedComponent, aggregate_hash, secret_hash,
};
use std::collections::BTreeSet;
use std::sync::Arc;

fn platform(seed: u8) -> Arc<dyn Platform> {
    Arc::new(SoftwarePlatform::new([seed; 32]))
}

fn digest(text: &str) -> Digest {
    Digest::of("test", text.as_bytes())
}

/// A primary, `f + 1` active and the remaining passive enclaves of `n = 2f + 1`,
/// all in view 1 under the primary.
struct Cluster {
    primary: SoftwareEnclave,
    primary_platform: Arc<dyn Platform>,
    actives: Vec<SoftwareEnclave>,
    passives: Vec<SoftwareEnclave>,
    tree: Tree,
}

impl Cluster {
    fn new(n: usize, fan_out: usize) -> Cluster {
        let f = (n - 1) / 2;
        let primary_platform = platform(100);
        let mut primary = SoftwareEnclave::create(primary_platform.clone());
        let mut actives: Vec<SoftwareEnclave> = (0..f + 1)
            .map(|i| SoftwareEnclave::create(platform(i as u8)))
            .collect();
        let mut passives: Vec<SoftwareEnclave> = (f + 2..n)
            .map(|i| SoftwareEnclave::create(platform(i as u8)))
            .collect();
        let tree = Tree::balanced(f + 1, fan_out).unwrap();
        // Fig. 6: the new primary certifies (c + 1, v) for NEW-VIEW, then becomes
        // primary; the others enter the view with that certificate.
        let new_view = primary.request_counter(&digest("new view")).unwrap();
        let keys: Vec<PublicKey> = actives.iter().map(|e| e.public_key()).collect();
        let wrapped = primary.be_primary(&keys, tree).unwrap();
        let primary_key = primary.public_key();
        for (enclave, key) in actives.iter_mut().zip(&wrapped) {
            enclave
                .update_view(&primary_key, &new_view, Some(key))
                .unwrap();
        }
        for enclave in &mut passives {
            enclave.update_view(&primary_key, &new_view, None).unwrap();
        }
        Cluster {
            primary,
            primary_platform,
            actives,
            passives,
            tree,
        }
    }
}

/// Runs one counter value through the tree: every active enclave opens its share,
/// each aggregate is checked against its parent's hash, the primary reconstructs
/// the secret and the passive enclaves follow. Returns the secret.
fn run_counter(cluster: &mut Cluster, prepared: &Preprocessed, x: &Digest) -> Share {
    let cert = cluster.primary.request_counter(x).unwrap();
    let (c, v) = (cert.counter, cert.view);
    assert_eq!(
        (c, v),
        (prepared.commitment.counter, prepared.commitment.view)
    );
    let opened: Vec<_> = cluster
        .actives
        .iter_mut()
        .zip(&prepared.packages)
        .map(|(enclave, package)| enclave.verify_counter(&cert, package).unwrap())
        .collect();
    let tree = cluster.tree;
    let mut aggregates: Vec<Share> = opened.iter().map(|o| o.share).collect();
    for i in (0..tree.len()).rev() {
        assert_eq!(opened[i].secret_hash, prepared.commitment.secret_hash);
        assert_eq!(opened[i].children_hashes.len(), tree.children(i).len());
        for (k, j) in tree.children(i).enumerate() {
            assert_eq!(
                aggregate_hash(&aggregates[j], c, v),
                opened[i].children_hashes[k],
                "the child's aggregate matches the parent's hash"
            );
            aggregates[i] = aggregates[i].xor(&aggregates[j]);
        }
    }
    let mut secret = Share::default();
    for (k, j) in tree.root_children().enumerate() {
        assert_eq!(
            aggregate_hash(&aggregates[j], c, v),
            prepared.root_children_hashes[k]
        );
        secret = secret.xor(&aggregates[j]);
    }
    let all = opened.iter().fold(Share::default(), |a, o| a.xor(&o.share));
    assert_eq!(all, secret, "the shares XOR up to the secret");
    assert_eq!(secret_hash(&secret, c, v), prepared.commitment.secret_hash);
    assert!(prepared.commitment.verify(&cluster.primary.public_key()));
    for enclave in &mut cluster.passives {
        enclave
            .update_counter(&secret, &prepared.commitment)
            .unwrap();
    }
    secret
}

#[test]
fn shares_open_along_the_tree_and_xor_up_to_the_secret() {
    for n in [3, 5, 7, 9] {
        for fan_out in [1, 2, 3] {
            let mut cluster = Cluster::new(n, fan_out);
            assert_eq!(cluster.primary.fastbft_counter(), (0, 1));
            let prepared = cluster.primary.preprocessing(3).unwrap();
            assert_eq!(prepared.len(), 3);
            let mut secrets = BTreeSet::new();
            for (k, p) in prepared.iter().enumerate() {
                assert_eq!(p.commitment.counter, k as u64 + 1);
                assert_eq!(p.packages.len(), (n - 1) / 2 + 1);
                secrets.insert(run_counter(&mut cluster, p, &digest(&format!("m{k}"))).0);
            }
            assert_eq!(secrets.len(), 3, "one fresh secret per counter value");
            for enclave in cluster.actives.iter().chain(&cluster.passives) {
                assert_eq!(enclave.fastbft_counter(), (3, 1), "n {n}");
            }
        }
    }
}

#[test]
fn wrong_and_replayed_counter_values_are_refused() {
    let mut cluster = Cluster::new(5, 2);
    let prepared = cluster.primary.preprocessing(2).unwrap();
    let first = cluster.primary.request_counter(&digest("a")).unwrap();
    let second = cluster.primary.request_counter(&digest("b")).unwrap();
    let active = &mut cluster.actives[0];
    assert_eq!(
        active.verify_counter(&second, &prepared[1].packages[0]),
        Err(FastBftError::WrongCounter {
            expected: 1,
            got: 2
        }),
        "counter value 2 before 1"
    );
    active
        .verify_counter(&first, &prepared[0].packages[0])
        .unwrap();
    assert_eq!(
        active.verify_counter(&first, &prepared[0].packages[0]),
        Err(FastBftError::WrongCounter {
            expected: 2,
            got: 1
        }),
        "a replayed counter value"
    );
    let passive = &mut cluster.passives[0];
    let wrong = passive.update_counter(&Share([7; 32]), &prepared[1].commitment);
    assert_eq!(
        wrong,
        Err(FastBftError::WrongCounter {
            expected: 1,
            got: 2
        })
    );
}

#[test]
fn a_secret_is_released_only_for_the_counter_value_it_is_bound_to() {
    let mut cluster = Cluster::new(5, 2);
    let prepared = cluster.primary.preprocessing(2).unwrap();
    let first = cluster.primary.request_counter(&digest("a")).unwrap();
    let active = &mut cluster.actives[1];
    // The package of counter value 2 with the certificate of counter value 1.
    assert_eq!(
        active.verify_counter(&first, &prepared[1].packages[1]),
        Err(FastBftError::PackageMismatch)
    );
    // Relabelling the package's clear counter value breaks its authentication.
    let mut relabelled = prepared[1].packages[1].clone();
    relabelled.counter = 1;
    assert_eq!(
        active.verify_counter(&first, &relabelled),
        Err(FastBftError::BadEncryption)
    );
    assert_eq!(active.fastbft_counter(), (0, 1), "refusals change nothing");
    active
        .verify_counter(&first, &prepared[0].packages[1])
        .unwrap();
}

#[test]
fn a_certificate_of_another_view_is_refused() {
    let mut cluster = Cluster::new(5, 2);
    let prepared = cluster.primary.preprocessing(1).unwrap();
    // The primary's host makes it primary again: view 2, counter restarted.
    let keys: Vec<PublicKey> = cluster.actives.iter().map(|e| e.public_key()).collect();
    cluster.primary.be_primary(&keys, cluster.tree).unwrap();
    let in_view_2 = cluster.primary.request_counter(&digest("a")).unwrap();
    assert_eq!((in_view_2.counter, in_view_2.view), (1, 2));
    assert_eq!(
        cluster.actives[0].verify_counter(&in_view_2, &prepared[0].packages[0]),
        Err(FastBftError::PackageMismatch),
        "a view-1 package for a view-2 certificate"
    );
    let next = cluster.primary.preprocessing(1).unwrap();
    assert_eq!(
        cluster.actives[0].verify_counter(&in_view_2, &next[0].packages[0]),
        Err(FastBftError::BadEncryption),
        "a view-2 package under a view key the replica never received"
    );
    assert_eq!(
        cluster.passives[0].update_counter(&Share::default(), &next[0].commitment),
        Err(FastBftError::WrongView {
            expected: 1,
            got: 2
        })
    );
}

#[test]
fn a_package_for_another_replica_or_tampered_is_refused() {
    let mut cluster = Cluster::new(7, 2);
    let prepared = cluster.primary.preprocessing(1).unwrap();
    let cert = cluster.primary.request_counter(&digest("a")).unwrap();
    let mine = cluster.actives[0].public_key();
    let active = &mut cluster.actives[0];
    assert_eq!(
        active.verify_counter(&cert, &prepared[0].packages[1]),
        Err(FastBftError::BadEncryption)
    );
    let mut readdressed = prepared[0].packages[1].clone();
    readdressed.recipient = mine;
    assert_eq!(
        active.verify_counter(&cert, &readdressed),
        Err(FastBftError::BadEncryption)
    );
    let original = prepared[0].packages[0].clone();
    for i in [
        0,
        original.ciphertext.len() / 2,
        original.ciphertext.len() - 1,
    ] {
        let mut bytes = original.ciphertext.to_vec();
        bytes[i] ^= 1;
        let mut tampered = original.clone();
        tampered.ciphertext = diffuse_core::codec::Blob::try_from_vec(bytes).unwrap();
        assert_eq!(
            active.verify_counter(&cert, &tampered),
            Err(FastBftError::BadEncryption)
        );
    }
    let mut other_view = original.clone();
    other_view.view = 2;
    assert_eq!(
        active.verify_counter(&cert, &other_view),
        Err(FastBftError::BadEncryption)
    );
    // Garbage of every length up to a few blocks: refused, never a panic.
    for len in 0..200 {
        let mut garbage = original.clone();
        garbage.ciphertext = diffuse_core::codec::Blob::try_from_vec(vec![len as u8; len]).unwrap();
        assert_eq!(
            active.verify_counter(&cert, &garbage),
            Err(FastBftError::BadEncryption)
        );
    }
    assert_eq!(active.fastbft_counter(), (0, 1));
    active.verify_counter(&cert, &original).unwrap();
}

#[test]
fn a_forged_primary_signature_is_refused() {
    let mut cluster = Cluster::new(5, 2);
    let prepared = cluster.primary.preprocessing(1).unwrap();
    let cert = cluster.primary.request_counter(&digest("a")).unwrap();
    // Another enclave certifies the same (c, v): not the primary's.
    let mut impostor = SoftwareEnclave::create(platform(200));
    impostor.request_counter(&digest("x")).unwrap();
    let keys = vec![cluster.actives[0].public_key()];
    impostor
        .be_primary(&keys, Tree::balanced(1, 2).unwrap())
        .unwrap();
    let forged = impostor.request_counter(&digest("b")).unwrap();
    assert_eq!((forged.counter, forged.view), (cert.counter, cert.view));
    assert_eq!(
        cluster.actives[0].verify_counter(&forged, &prepared[0].packages[0]),
        Err(FastBftError::BadSignature)
    );
    // The primary's signature over another message.
    let altered = Signed {
        value: CounterCertificate {
            message: digest("b"),
            ..cert.value
        },
        signature: cert.signature,
    };
    assert_eq!(
        cluster.actives[0].verify_counter(&altered, &prepared[0].packages[0]),
        Err(FastBftError::BadSignature)
    );
    // A secret commitment by the impostor.
    let fake = impostor.preprocessing(1).unwrap();
    assert_eq!(
        cluster.passives[0].update_counter(&Share::default(), &fake[0].commitment),
        Err(FastBftError::BadSignature)
    );
}

#[test]
fn a_wrong_secret_is_refused_at_update_counter() {
    let mut cluster = Cluster::new(5, 2);
    let prepared = cluster.primary.preprocessing(2).unwrap();
    let secret = run_counter_without_passives(&mut cluster, &prepared[0]);
    let passive = &mut cluster.passives[0];
    assert_eq!(
        passive.update_counter(&Share([1; 32]), &prepared[0].commitment),
        Err(FastBftError::WrongSecret)
    );
    let mut flipped = secret;
    flipped.0[0] ^= 1;
    assert_eq!(
        passive.update_counter(&flipped, &prepared[0].commitment),
        Err(FastBftError::WrongSecret)
    );
    assert_eq!(passive.fastbft_counter(), (0, 1));
    passive
        .update_counter(&secret, &prepared[0].commitment)
        .unwrap();
    assert_eq!(passive.fastbft_counter(), (1, 1));
}

fn run_counter_without_passives(cluster: &mut Cluster, prepared: &Preprocessed) -> Share {
    let passives = std::mem::take(&mut cluster.passives);
    let secret = run_counter(cluster, prepared, &digest("m"));
    cluster.passives = passives;
    secret
}

#[test]
fn the_primary_never_certifies_one_counter_value_twice() {
    let mut cluster = Cluster::new(5, 2);
    let keys: Vec<PublicKey> = cluster.actives.iter().map(|e| e.public_key()).collect();
    let primary = &mut cluster.primary;
    let mut certified = BTreeSet::new();
    let mut committed = BTreeSet::new();
    // Interleave requests, preprocessing (also repeated, also behind the counter)
    // and new views, as a Byzantine host might.
    for round in 0..4 {
        for step in 0..12u64 {
            match step % 4 {
                0 | 1 => {
                    let cert = primary.request_counter(&digest("x")).unwrap();
                    assert!(certified.insert((cert.counter, cert.view)));
                }
                2 => {
                    for p in primary.preprocessing(2).unwrap() {
                        assert!(committed.insert((p.commitment.counter, p.commitment.view)));
                    }
                }
                _ => {
                    for p in primary.preprocessing(0).unwrap() {
                        assert!(committed.insert((p.commitment.counter, p.commitment.view)));
                    }
                }
            }
        }
        assert_eq!(primary.fastbft_counter().1, 1 + round);
        primary.be_primary(&keys, cluster.tree).unwrap();
    }
    assert_eq!(certified.len(), 4 * 6);
}

#[test]
fn roles_bounds_and_lock_are_enforced() {
    let mut cluster = Cluster::new(5, 2);
    let prepared = cluster.primary.preprocessing(1).unwrap();
    let cert = cluster.primary.request_counter(&digest("a")).unwrap();
    assert_eq!(
        cluster.passives[0].verify_counter(&cert, &prepared[0].packages[0]),
        Err(FastBftError::WrongRole("active"))
    );
    assert_eq!(
        cluster.actives[0].preprocessing(1).err(),
        Some(FastBftError::WrongRole("the primary"))
    );
    assert!(matches!(
        cluster.primary.preprocessing(MAX_PREPROCESSING + 1),
        Err(FastBftError::Invalid(_))
    ));
    cluster
        .primary
        .preprocessing(MAX_PREPROCESSING - 1)
        .unwrap();
    assert!(
        matches!(
            cluster.primary.preprocessing(2),
            Err(FastBftError::Invalid(_))
        ),
        "at most MAX_PREPROCESSING ahead of c_latest"
    );
    let a = cluster.actives[0].public_key();
    let me = cluster.primary.public_key();
    let two = Tree::balanced(2, 2).unwrap();
    for bad in [vec![a, a], vec![a, me], vec![a]] {
        assert!(matches!(
            cluster.primary.be_primary(&bad, two),
            Err(FastBftError::Invalid(_))
        ));
    }
    // A locked (sealed) enclave does nothing.
    let _sealed = cluster.actives[1].seal_and_stop();
    assert_eq!(
        cluster.actives[1].verify_counter(&cert, &prepared[0].packages[1]),
        Err(FastBftError::Locked)
    );
    assert_eq!(
        cluster.actives[1].request_counter(&digest("a")).err(),
        Some(FastBftError::Locked)
    );
}

#[test]
fn update_view_checks_the_certificate_and_the_wrapped_key() {
    let mut primary = SoftwareEnclave::create(platform(50));
    let mut active = SoftwareEnclave::create(platform(51));
    let other = SoftwareEnclave::create(platform(52));
    let keys = vec![active.public_key(), other.public_key()];
    let tree = Tree::balanced(2, 2).unwrap();
    let early = primary.request_counter(&digest("skip")).unwrap();
    let new_view = primary.request_counter(&digest("new view")).unwrap();
    let wrapped = primary.be_primary(&keys, tree).unwrap();
    let p = primary.public_key();
    assert_eq!(
        active.update_view(&p, &new_view, Some(&wrapped[0])),
        Err(FastBftError::WrongCounter {
            expected: 1,
            got: 2
        })
    );
    assert_eq!(
        active.update_view(&other.public_key(), &early, Some(&wrapped[0])),
        Err(FastBftError::BadSignature)
    );
    assert_eq!(
        active.update_view(&p, &early, Some(&wrapped[1])),
        Err(FastBftError::BadEncryption),
        "the key wrapped for another replica"
    );
    let mut readdressed = wrapped[1].clone();
    readdressed.recipient = active.public_key();
    assert_eq!(
        active.update_view(&p, &early, Some(&readdressed)),
        Err(FastBftError::BadEncryption)
    );
    let mut relabelled = wrapped[0].clone();
    relabelled.view = 2;
    assert_eq!(
        active.update_view(&p, &early, Some(&relabelled)),
        Err(FastBftError::BadEncryption)
    );
    assert_eq!(active.fastbft_counter(), (0, 0));
    active.update_view(&p, &early, Some(&wrapped[0])).unwrap();
    assert_eq!(active.fastbft_counter(), (0, 1));
    assert!(
        active.update_view(&p, &early, Some(&wrapped[0])).is_err(),
        "a new-view certificate is used once"
    );
}

/// A scheduled shutdown seals the whole FastBFT state: the resumed enclave goes
/// on where it stopped, as the primary with its view keys, and never certifies a
/// position twice.
#[test]
fn a_resumed_enclave_goes_on_where_it_stopped() {
    let mut cluster = Cluster::new(5, 2);
    let prepared = cluster.primary.preprocessing(1).unwrap();
    let before = cluster.primary.request_counter(&digest("x")).unwrap();
    let sealed = cluster.primary.shutdown();
    let mut resumed = SoftwareEnclave::resume(cluster.primary_platform, &sealed).unwrap();
    assert!(!resumed.is_locked());
    assert_eq!(resumed.fastbft_counter(), (before.counter, before.view));
    assert_eq!(resumed.fastbft_leaving(), None);
    let next = resumed.request_counter(&digest("y")).unwrap();
    assert_eq!((next.view, next.counter), (before.view, before.counter + 1));
    // Its view keys came back too: the next preprocessing opens at the actives.
    let more = resumed.preprocessing(1).unwrap();
    assert!(more[0].commitment.counter > prepared[0].commitment.counter);
}

#[test]
fn follow_counter_steps_over_an_unopened_counter_value_in_order_only() {
    let mut cluster = Cluster::new(5, 2);
    let prepared = cluster.primary.preprocessing(2).unwrap();
    let first = cluster
        .primary
        .request_counter(&digest("in flight"))
        .unwrap();
    let second = cluster.primary.request_counter(&digest("next")).unwrap();
    let active = &mut cluster.actives[0];
    assert!(matches!(
        active.follow_counter(&second),
        Err(FastBftError::WrongCounter { .. })
    ));
    active.follow_counter(&first).unwrap();
    assert_eq!(
        active.verify_counter(&first, &prepared[0].packages[0]),
        Err(FastBftError::WrongCounter {
            expected: 2,
            got: 1
        }),
        "a followed counter value releases no share afterwards"
    );
    active
        .verify_counter(&second, &prepared[1].packages[0])
        .unwrap();
    let passive = &mut cluster.passives[0];
    let mut forged = first.clone();
    forged.value.message = digest("forged");
    assert_eq!(
        passive.follow_counter(&forged),
        Err(FastBftError::BadSignature)
    );
    passive.follow_counter(&first).unwrap();
    passive.follow_counter(&second).unwrap();
    assert_eq!(passive.fastbft_counter(), (2, 1));
    assert_eq!(
        cluster.primary.follow_counter(&first),
        Err(FastBftError::WrongRole("a backup"))
    );
}

#[test]
fn a_configured_primary_takes_exactly_f_peers_as_actives() {
    let mut enclaves: Vec<SoftwareEnclave> = (0..5)
        .map(|i| SoftwareEnclave::create(platform(40 + i)))
        .collect();
    let keys: Vec<PublicKey> = enclaves.iter().map(|e| e.public_key()).collect();
    for enclave in &mut enclaves {
        enclave.configure(keys.clone(), 3).unwrap();
    }
    let primary = &mut enclaves[0];
    let outsider = SoftwareEnclave::create(platform(99)).public_key();
    // n = 5, f = 2: the primary and two peers are the f + 1 = 3 active replicas.
    assert!(matches!(
        primary.be_primary(&keys[1..4], Tree::balanced(3, 2).unwrap()),
        Err(FastBftError::Invalid(_))
    ));
    assert!(matches!(
        primary.be_primary(&[keys[1], outsider], Tree::balanced(2, 2).unwrap()),
        Err(FastBftError::Invalid(_))
    ));
    primary
        .be_primary(&keys[1..3], Tree::balanced(2, 2).unwrap())
        .unwrap();
}
