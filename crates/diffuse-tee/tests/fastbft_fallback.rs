//! The fallback's threshold epochs (§4.5): every backup gets a Shamir share, and
//! the primary's share with any `f` backups' opens the secret.

use diffuse_core::crypto::{Digest, PublicKey};
use diffuse_tee::{
    FastBftComponent, FastBftError, SoftwareEnclave, SoftwarePlatform, TrustedComponent,
    aggregate_hash, combine_threshold, secret_hash, threshold_point,
};
use std::sync::Arc;

fn digest(text: &str) -> Digest {
    Digest::of("test", text.as_bytes())
}

/// `n` configured enclaves (threshold `f + 1`), replica 0 the primary of a
/// threshold epoch with every other replica active.
fn threshold_cluster(n: usize) -> (Vec<SoftwareEnclave>, Vec<PublicKey>) {
    let f = (n - 1) / 2;
    let mut enclaves: Vec<SoftwareEnclave> = (0..n)
        .map(|i| SoftwareEnclave::create(Arc::new(SoftwarePlatform::new([i as u8 + 40; 32]))))
        .collect();
    let keys: Vec<PublicKey> = enclaves.iter().map(|e| e.public_key()).collect();
    for enclave in &mut enclaves {
        enclave.configure(keys.clone(), f + 1).unwrap();
    }
    let cert = enclaves[0].request_counter(&digest("fallback")).unwrap();
    let wrapped = enclaves[0].be_primary_threshold(&keys[1..]).unwrap();
    for (i, enclave) in enclaves.iter_mut().enumerate().skip(1) {
        enclave
            .update_view(&keys[0], &cert, Some(&wrapped[i - 1]))
            .unwrap();
    }
    (enclaves, keys)
}

#[test]
fn the_primary_and_any_f_backups_open_a_secret_and_fewer_do_not() {
    for n in [3, 5, 7, 9] {
        let f = (n - 1) / 2;
        let (mut enclaves, _) = threshold_cluster(n);
        let prepared = enclaves[0].preprocessing(1).unwrap().remove(0);
        assert_eq!(prepared.packages.len(), n - 1);
        let own = prepared.primary_share.expect("the primary holds a share");
        let cert = enclaves[0].request_counter(&digest("prepare")).unwrap();
        let (c, v) = (cert.counter, cert.view);
        let mut shares = Vec::new();
        for (i, enclave) in enclaves.iter_mut().enumerate().skip(1) {
            let opened = enclave
                .verify_counter(&cert, &prepared.packages[i - 1])
                .unwrap();
            assert!(opened.children_hashes.is_empty(), "no tree");
            assert_eq!(opened.secret_hash, prepared.commitment.secret_hash);
            assert_eq!(
                aggregate_hash(&opened.share, c, v),
                prepared.root_children_hashes[i - 1],
                "the primary can check each share"
            );
            shares.push((threshold_point(i - 1), opened.share));
        }
        // Any f backups: the first, the last, every other.
        let pick = |indices: &[usize]| {
            let mut points = vec![(diffuse_tee::THRESHOLD_PRIMARY_POINT, own)];
            points.extend(indices.iter().map(|&i| shares[i]));
            combine_threshold(&points).unwrap()
        };
        let first: Vec<usize> = (0..f).collect();
        let last: Vec<usize> = (n - 1 - f..n - 1).collect();
        let odd: Vec<usize> = (0..n - 1).filter(|i| i % 2 == 1).take(f).collect();
        for set in [&first, &last, &odd] {
            let secret = pick(set);
            assert_eq!(
                secret_hash(&secret, c, v),
                prepared.commitment.secret_hash,
                "n = {n}: {set:?}"
            );
        }
        if f > 1 {
            let secret = pick(&first[..f - 1]);
            assert_ne!(secret_hash(&secret, c, v), prepared.commitment.secret_hash);
        }
        // Without the primary's share, f backups are not enough either.
        let backups_only: Vec<_> = first.iter().map(|&i| shares[i]).collect();
        let without = combine_threshold(&backups_only).unwrap();
        assert_ne!(secret_hash(&without, c, v), prepared.commitment.secret_hash);
    }
}

#[test]
fn a_threshold_epoch_shares_with_every_configured_peer() {
    let n = 5;
    let mut enclaves: Vec<SoftwareEnclave> = (0..n)
        .map(|i| SoftwareEnclave::create(Arc::new(SoftwarePlatform::new([i as u8 + 60; 32]))))
        .collect();
    let keys: Vec<PublicKey> = enclaves.iter().map(|e| e.public_key()).collect();
    for enclave in &mut enclaves {
        enclave.configure(keys.clone(), 3).unwrap();
    }
    enclaves[0].request_counter(&digest("x")).unwrap();
    assert!(matches!(
        enclaves[0].be_primary_threshold(&keys[1..4]),
        Err(FastBftError::Invalid(_))
    ));
    enclaves[0].be_primary_threshold(&keys[1..]).unwrap();
}
