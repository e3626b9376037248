//! Uses a running cluster from Rust.
//!
//! ```sh
//! diffuse testnet --n 4 --out testnet
//! for i in 0 1 2 3; do diffuse node --config testnet/replica-$i.toml & done
//! cargo run -p diffuse-client --example kv -- testnet/client-0.toml
//! ```

use diffuse_client::{ClientConfig, KvClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "testnet/client-0.toml".into());
    let settings = ClientConfig::load(path.as_ref())?;
    let mut kv = KvClient::connect(settings).await?;

    kv.put(b"greeting", b"hello").await?;
    let value = kv.get(b"greeting").await?;
    println!("greeting = {:?}", value.map(String::from_utf8));

    let (swapped, previous) = kv.cas(b"greeting", Some(b"hello"), b"bonjour").await?;
    println!("cas swapped: {swapped} (previous {previous:?})");

    let existed = kv.delete(b"greeting").await?;
    println!("deleted: {existed}");
    Ok(())
}
