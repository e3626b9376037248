//! The replicated-service snapshot decoder (state transfer input from peers).
#![no_main]

use diffuse_apps::KvStore;
use diffuse_core::service::ReplicatedService;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut service = ReplicatedService::new(Box::new(KvStore::default()));
    let before = service.snapshot().digest;
    if service.restore(data).is_err() {
        assert_eq!(service.snapshot().digest, before, "a failed restore changes nothing");
    }
});
