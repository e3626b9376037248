//! `diffuse keygen`: a key file from operating-system randomness.

use clap::{Args, ValueEnum};
use diffuse_core::config::{KeyFile, Role};
use diffuse_core::crypto::SecretKey;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Replica,
    Client,
}

/// Arguments of `diffuse keygen`.
#[derive(Args)]
pub struct KeygenArgs {
    /// Whether the key is for a replica or a client.
    #[arg(long, value_enum, default_value = "replica")]
    role: RoleArg,
    /// The member's id (replica index, or client id).
    #[arg(long)]
    id: u32,
    /// Where to write the key file (it must not exist yet). Prints to stdout if absent.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: KeygenArgs) -> ExitCode {
    let mut seed = [0u8; 32];
    if let Err(error) = getrandom::fill(&mut seed) {
        eprintln!("error: no operating-system randomness: {error}");
        return ExitCode::from(1);
    }
    let role = match args.role {
        RoleArg::Replica => Role::Replica,
        RoleArg::Client => Role::Client,
    };
    let text = KeyFile::new(role, args.id, &SecretKey::from_seed(seed)).to_toml();
    match args.out {
        None => print!("{text}"),
        Some(path) => {
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .and_then(|mut file| std::io::Write::write_all(&mut file, text.as_bytes()));
            if let Err(error) = written {
                eprintln!("error: cannot write {}: {error}", path.display());
                return ExitCode::from(1);
            }
            eprintln!("wrote {}", path.display());
        }
    }
    ExitCode::SUCCESS
}
