//! The key-value store's operation, result and snapshot decoders.
#![no_main]

use diffuse_apps::{KvOp, KvResult, KvStore};
use diffuse_core::app::Application;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut store = KvStore::default();
    let result = store.execute(data);
    assert!(KvResult::decode(&result).is_ok(), "execute always answers with a valid result");
    if let Ok(op) = KvOp::decode(data) {
        assert_eq!(KvOp::decode(&op.encode()), Ok(op));
    }
    let _ = KvResult::decode(data);
    let before = store.digest();
    if store.restore(data).is_err() {
        assert_eq!(store.digest(), before, "a failed restore changes nothing");
    }
});
