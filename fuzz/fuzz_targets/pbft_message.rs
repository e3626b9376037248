//! The PBFT wire decoder: arbitrary bytes never panic it, and whatever decodes
//! re-encodes to a frame that decodes to the same message.
#![no_main]

use diffuse_core::codec::{decode, encode};
use diffuse_pbft::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = decode::<Message>(data) {
        let again: Message = decode(&encode(&message)).expect("re-encoded frame decodes");
        assert_eq!(again, message);
    }
});
