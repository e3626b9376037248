//! The cluster-file and key-file parsers.
#![no_main]

use diffuse_core::config::{ClusterFile, KeyFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(file) = ClusterFile::parse(text) {
            assert!(ClusterFile::parse(&file.to_toml()).is_ok());
        }
        if let Ok(file) = KeyFile::parse(text) {
            assert!(KeyFile::parse(&file.to_toml()).is_ok());
        }
    }
});
