//! The software enclave's guarantees: unique counters, attestation, sealing, and
//! rollback protection (FastBFT §6.1).

use diffuse_core::crypto::{Digest, SecretKey};
use diffuse_tee::{
    Measurement, Platform, QuoteError, Scope, SlotRules, SoftwareEnclave, SoftwarePlatform,
    TeeError, TrustedComponent, verify_quote, verify_scoped_ui, verify_ui,
};
use std::sync::Arc;

fn platform(seed: u8) -> Arc<dyn Platform> {
    Arc::new(SoftwarePlatform::new([seed; 32]))
}

fn digest(text: &str) -> Digest {
    Digest::of("test", text.as_bytes())
}

#[test]
fn counters_are_sequential_and_certificates_bind_the_message() {
    let mut enclave = SoftwareEnclave::create(platform(1));
    let key = enclave.public_key();
    let a = enclave.create_ui(&digest("a")).unwrap();
    let b = enclave.create_ui(&digest("b")).unwrap();
    assert_eq!((a.counter, b.counter), (1, 2));
    assert!(verify_ui(&key, &digest("a"), &a));
    assert!(enclave.verify_ui(&key, &digest("b"), &b));
    assert!(
        !verify_ui(&key, &digest("b"), &a),
        "a UI certifies one message"
    );
    let mut forged = a;
    forged.counter = 2;
    assert!(
        !verify_ui(&key, &digest("a"), &forged),
        "nor another counter value"
    );
    let other = SoftwareEnclave::create(platform(2));
    assert!(
        !verify_ui(&other.public_key(), &digest("a"), &a),
        "nor another enclave"
    );
}

#[test]
fn quotes_vouch_for_the_enclave_key_on_a_trusted_platform() {
    let trusted = platform(1);
    let enclave = SoftwareEnclave::create(trusted.clone());
    let data = digest("replica 0 of cluster X");
    let quote = enclave.attest(data);
    let measurement = Measurement::software_enclave_v1();
    let platforms = [trusted.attestation_key()];
    assert_eq!(
        verify_quote(&quote, &platforms, &measurement, &data),
        Ok(enclave.public_key())
    );
    assert_eq!(
        verify_quote(
            &quote,
            &[platform(2).attestation_key()],
            &measurement,
            &data
        ),
        Err(QuoteError::UntrustedPlatform)
    );
    let other_code = Measurement(digest("other code"));
    assert_eq!(
        verify_quote(&quote, &platforms, &other_code, &data),
        Err(QuoteError::WrongMeasurement)
    );
    assert_eq!(
        verify_quote(&quote, &platforms, &measurement, &digest("replica 1")),
        Err(QuoteError::WrongCallerData)
    );
    let mut tampered = quote.clone();
    tampered.body.value.enclave_key = SecretKey::from_seed([9; 32]).public();
    assert_eq!(
        verify_quote(&tampered, &platforms, &measurement, &data),
        Err(QuoteError::BadSignature)
    );
}

#[test]
fn a_scheduled_shutdown_resumes_where_it_stopped() {
    let hardware = platform(1);
    let mut enclave = SoftwareEnclave::create(hardware.clone());
    let key = enclave.public_key();
    for i in 0..5 {
        enclave.create_ui(&digest(&i.to_string())).unwrap();
    }
    let sealed = enclave.shutdown();
    let mut resumed = SoftwareEnclave::resume(hardware, &sealed).unwrap();
    assert!(!resumed.is_locked());
    assert_eq!(resumed.public_key(), key, "the identity survives");
    assert_eq!(resumed.create_ui(&digest("next")).unwrap().counter, 6);
}

#[test]
fn a_shared_enclave_certifies_nothing_after_sealing() {
    let hardware = platform(1);
    let mut enclave = SoftwareEnclave::create(hardware.clone());
    enclave.create_ui(&digest("a")).unwrap();
    let sealed = enclave.seal_and_stop();
    assert_eq!(
        enclave.create_ui(&digest("b")),
        Err(TeeError::Locked),
        "nothing may follow the sealed counter value"
    );
    assert_eq!(
        enclave.rejoin_challenge(),
        None,
        "nor can a REJOIN restart it"
    );
    let mut resumed = SoftwareEnclave::resume(hardware.clone(), &sealed).unwrap();
    assert_eq!(resumed.create_ui(&digest("b")).unwrap().counter, 2);

    resumed.seal_and_stop();
    let resealed = resumed.seal_and_stop();
    let again = SoftwareEnclave::resume(hardware, &resealed).unwrap();
    assert!(
        again.is_locked(),
        "a stopped enclave seals only a locked state"
    );
}

#[test]
fn the_rollback_attack_is_refused() {
    let hardware = platform(1);
    let mut enclave = SoftwareEnclave::create(hardware.clone());
    enclave.create_ui(&digest("m1")).unwrap();
    let old = enclave.shutdown();
    // The host resumes, gets counter 2 bound to A, then restores the old sealed
    // state to get counter 2 bound to B.
    let mut first = SoftwareEnclave::resume(hardware.clone(), &old).unwrap();
    let a = first.create_ui(&digest("A")).unwrap();
    assert_eq!(a.counter, 2);
    let mut rolled_back = SoftwareEnclave::resume(hardware.clone(), &old).unwrap();
    assert!(rolled_back.is_locked());
    assert_eq!(rolled_back.create_ui(&digest("B")), Err(TeeError::Locked));
}

#[test]
fn without_rollback_protection_the_attack_equivocates() {
    let hardware = platform(1);
    let mut enclave = SoftwareEnclave::create(hardware.clone());
    enclave.create_ui(&digest("m1")).unwrap();
    let old = enclave.shutdown();
    let mut first = SoftwareEnclave::resume(hardware.clone(), &old).unwrap();
    let a = first.create_ui(&digest("A")).unwrap();
    let mut rolled_back =
        SoftwareEnclave::resume_without_rollback_protection(hardware, &old).unwrap();
    let b = rolled_back.create_ui(&digest("B")).unwrap();
    assert_eq!(a.counter, b.counter, "two messages under one counter value");
    let key = first.public_key();
    assert!(verify_ui(&key, &digest("A"), &a) && verify_ui(&key, &digest("B"), &b));
}

/// Four enclaves that know each other, f = 1 (two reports reset a counter).
fn cluster() -> (Arc<dyn Platform>, SoftwareEnclave, Vec<SoftwareEnclave>) {
    let hardware = platform(1);
    let mut subject = SoftwareEnclave::create(hardware.clone());
    let mut peers: Vec<SoftwareEnclave> = (0..3)
        .map(|i| SoftwareEnclave::create(platform(10 + i)))
        .collect();
    let all: Vec<_> = std::iter::once(subject.public_key())
        .chain(peers.iter().map(|p| p.public_key()))
        .collect();
    subject.configure(all.clone(), 2).unwrap();
    for peer in &mut peers {
        peer.configure(all.clone(), 2).unwrap();
    }
    (hardware, subject, peers)
}

#[test]
fn an_unscheduled_reboot_locks_until_enough_fresh_reports() {
    let (hardware, subject, mut peers) = cluster();
    let me = subject.public_key();
    let sealed = subject.shutdown();
    let mut running = SoftwareEnclave::resume(hardware.clone(), &sealed).unwrap();
    for i in 0..3 {
        let message = digest(&i.to_string());
        let ui = running.create_ui(&message).unwrap();
        for peer in &mut peers[..2] {
            assert!(peer.accept_ui(&me, Scope::Free, &message, &ui));
        }
    }
    // Crash: no scheduled shutdown, so only the older sealed state exists.
    drop(running);
    let mut rebooted = SoftwareEnclave::resume(hardware.clone(), &sealed).unwrap();
    assert!(rebooted.is_locked());
    let challenge = rebooted.rejoin_challenge().unwrap();
    let report = |peer: &SoftwareEnclave| peer.report_counter(me, challenge).unwrap();

    // One report is not enough, nor the same peer twice, nor a stranger.
    assert!(matches!(
        rebooted.reset_counter(&[report(&peers[0])], 0),
        Err(TeeError::NotEnoughReports { needed: 2, got: 1 })
    ));
    assert!(
        rebooted
            .reset_counter(&[report(&peers[0]), report(&peers[0])], 0)
            .is_err()
    );
    let mut stranger = SoftwareEnclave::create(platform(99));
    stranger
        .configure(vec![me, peers[0].public_key()], 1)
        .unwrap();
    let foreign = stranger.report_counter(me, challenge).unwrap();
    assert!(
        rebooted
            .reset_counter(&[report(&peers[0]), foreign], 0)
            .is_err()
    );
    assert!(rebooted.is_locked());

    // Peer 2 saw nothing (reports 0); the highest report wins, so no value repeats.
    rebooted
        .reset_counter(&[report(&peers[2]), report(&peers[0])], 0)
        .unwrap();
    assert!(!rebooted.is_locked());
    assert_eq!(rebooted.create_ui(&digest("after")).unwrap().counter, 4);
}

#[test]
fn reports_for_an_old_challenge_do_not_unlock() {
    let (hardware, subject, peers) = cluster();
    let me = subject.public_key();
    let sealed = subject.shutdown();
    drop(SoftwareEnclave::resume(hardware.clone(), &sealed).unwrap());
    let first = SoftwareEnclave::resume(hardware.clone(), &sealed).unwrap();
    let old = first.rejoin_challenge().unwrap();
    let stale: Vec<_> = peers[..2]
        .iter()
        .map(|p| p.report_counter(me, old).unwrap())
        .collect();
    let mut again = SoftwareEnclave::resume(hardware, &sealed).unwrap();
    assert_ne!(again.rejoin_challenge(), Some(old));
    assert!(again.reset_counter(&stale, 0).is_err(), "replayed reports");
    assert!(again.is_locked());
}

#[test]
fn a_locked_enclave_stays_locked_across_shutdown_and_resume() {
    let (hardware, subject, _) = cluster();
    let old = subject.shutdown();
    let mut first = SoftwareEnclave::resume(hardware.clone(), &old).unwrap();
    first.create_ui(&digest("A")).unwrap();
    let rolled_back = SoftwareEnclave::resume(hardware.clone(), &old).unwrap();
    assert!(rolled_back.is_locked());
    // The host tries to launder the lock with a scheduled shutdown.
    let laundered = rolled_back.shutdown();
    let mut resumed = SoftwareEnclave::resume(hardware, &laundered).unwrap();
    assert!(resumed.is_locked());
    assert_eq!(resumed.create_ui(&digest("B")), Err(TeeError::Locked));
}

#[test]
fn the_peers_are_fixed_once() {
    let (_, mut subject, _) = cluster();
    let stranger = SoftwareEnclave::create(platform(99));
    assert!(subject.configure(vec![stranger.public_key()], 1).is_err());
    let mut fresh = SoftwareEnclave::create(platform(5));
    assert!(
        fresh.configure(vec![stranger.public_key()], 2).is_err(),
        "threshold above peers"
    );
}

#[test]
fn each_enclave_draws_its_own_key() {
    let hardware = platform(1);
    let a = SoftwareEnclave::create(hardware.clone());
    let b = SoftwareEnclave::create(hardware);
    assert_ne!(a.public_key(), b.public_key());
}

#[test]
fn tampered_sealed_state_is_refused() {
    let hardware = platform(1);
    let enclave = SoftwareEnclave::create(hardware.clone());
    let sealed = enclave.shutdown();
    let mut bytes = sealed.0.to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let tampered =
        diffuse_tee::SealedState(diffuse_core::codec::Blob::try_from_vec(bytes).unwrap());
    assert_eq!(
        SoftwareEnclave::resume(hardware.clone(), &tampered).map(|_| ()),
        Err(TeeError::BadSealedState)
    );
    // Sealed on one platform, it does not open on another.
    assert_eq!(
        SoftwareEnclave::resume(platform(2), &sealed).map(|_| ()),
        Err(TeeError::BadSealedState)
    );
}

#[test]
fn an_honest_host_can_only_raise_the_counter_at_a_reset() {
    let (hardware, subject, mut peers) = cluster();
    let me = subject.public_key();
    let sealed = subject.shutdown();
    let mut running = SoftwareEnclave::resume(hardware.clone(), &sealed).unwrap();
    for i in 0..5 {
        let message = digest(&i.to_string());
        let ui = running.create_ui(&message).unwrap();
        // Only the first two reach the peers before the crash; the host persisted all.
        if i < 2 {
            for peer in &mut peers {
                assert!(peer.accept_ui(&me, Scope::Free, &message, &ui));
            }
        }
    }
    drop(running);
    let mut rebooted = SoftwareEnclave::resume(hardware, &sealed).unwrap();
    let challenge = rebooted.rejoin_challenge().unwrap();
    let reports: Vec<_> = peers[..2]
        .iter()
        .map(|p| p.report_counter(me, challenge).unwrap())
        .collect();
    rebooted.reset_counter(&reports, 5).unwrap();
    assert_eq!(rebooted.create_ui(&digest("after")).unwrap().counter, 6);
}

#[test]
fn a_locked_enclave_does_not_report() {
    let (hardware, subject, peers) = cluster();
    let sealed = subject.shutdown();
    drop(SoftwareEnclave::resume(hardware.clone(), &sealed).unwrap());
    let locked = SoftwareEnclave::resume(hardware, &sealed).unwrap();
    assert!(locked.is_locked());
    assert!(
        locked
            .report_counter(peers[0].public_key(), digest("c"))
            .is_none()
    );
}

fn ordered_enclave() -> SoftwareEnclave {
    let mut enclave = SoftwareEnclave::create(platform(7));
    enclave
        .configure_slots(SlotRules {
            checkpoint_interval: 4,
            window: 8,
        })
        .unwrap();
    enclave
}

#[test]
fn checkpoints_must_increase_by_multiples_of_the_interval() {
    let mut enclave = ordered_enclave();
    let key = enclave.public_key();
    let ui = enclave
        .create_scoped_ui(Scope::Checkpoint(4), &digest("s4"))
        .unwrap();
    assert!(verify_scoped_ui(
        &key,
        Scope::Checkpoint(4),
        &digest("s4"),
        &ui
    ));
    assert!(!verify_ui(&key, &digest("s4"), &ui), "the scope is signed");
    for bad in [4, 2, 6] {
        assert!(matches!(
            enclave.create_scoped_ui(Scope::Checkpoint(bad), &digest("x")),
            Err(TeeError::Scope(_))
        ));
    }
    assert_eq!(
        enclave.counter(),
        1,
        "a refused scope uses no counter value"
    );
    enclave
        .create_scoped_ui(Scope::Checkpoint(12), &digest("s12"))
        .unwrap();
    assert_eq!(enclave.last_checkpoint(), 12);
    assert!(
        enclave
            .configure_slots(SlotRules {
                checkpoint_interval: 1,
                window: 1
            })
            .is_err()
    );
}

#[test]
fn slots_stay_within_the_window_of_the_last_checkpoint() {
    let mut enclave = ordered_enclave();
    assert!(
        enclave
            .create_scoped_ui(Scope::Slot(8), &digest("8"))
            .is_ok()
    );
    assert!(matches!(
        enclave.create_scoped_ui(Scope::Slot(9), &digest("9")),
        Err(TeeError::Scope(_))
    ));
    enclave
        .create_scoped_ui(Scope::Checkpoint(4), &digest("cp"))
        .unwrap();
    assert!(
        enclave
            .create_scoped_ui(Scope::Slot(12), &digest("12"))
            .is_ok()
    );
    let mut unconfigured = SoftwareEnclave::create(platform(8));
    assert!(
        unconfigured
            .create_scoped_ui(Scope::Slot(1), &digest("1"))
            .is_err()
    );
}

#[test]
fn slot_rules_and_the_last_checkpoint_are_sealed() {
    let hardware = platform(3);
    let mut enclave = SoftwareEnclave::create(hardware.clone());
    enclave
        .configure_slots(SlotRules {
            checkpoint_interval: 2,
            window: 4,
        })
        .unwrap();
    enclave
        .create_scoped_ui(Scope::Checkpoint(6), &digest("cp"))
        .unwrap();
    let mut resumed = SoftwareEnclave::resume(hardware, &enclave.shutdown()).unwrap();
    assert_eq!(resumed.last_checkpoint(), 6);
    assert!(
        resumed
            .create_scoped_ui(Scope::Checkpoint(6), &digest("again"))
            .is_err()
    );
    assert!(
        resumed
            .create_scoped_ui(Scope::Slot(10), &digest("10"))
            .is_ok()
    );
}
