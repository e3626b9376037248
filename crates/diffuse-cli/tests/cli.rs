//! The `diffuse` binary as a user runs it.

use std::process::Command;

fn diffuse(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(args)
        .output()
        .expect("the binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn sim_json_reports_the_documented_fields() {
    let (code, stdout, stderr) = diffuse(&[
        "sim",
        "--protocol",
        "pbft",
        "--n",
        "4",
        "--seeds",
        "12",
        "--faults",
        "all",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(json["runs"], 12);
    assert_eq!(json["violations"], 0);
    assert!(json["ops"].as_u64().unwrap() > 0);
    assert!(json["msgs_per_op"].as_f64().unwrap() > 0.0);
    assert!(json["bytes_per_op"].as_f64().unwrap() > 0.0);
}

#[test]
fn sim_table_and_exit_code_on_a_caught_mutant() {
    let (code, stdout, _) = diffuse(&[
        "sim",
        "--seeds",
        "40",
        "--faults",
        "wrong-digest",
        "--mutant",
        "client-trusts-first-reply",
    ]);
    assert_eq!(code, 1, "a violation makes the command fail");
    assert!(stdout.contains("violations by checker"));
    assert!(stdout.contains("replay: diffuse sim --protocol pbft --n 4 --faults wrong-digest --mutant client-trusts-first-reply --seed"));
}

#[test]
fn sim_replays_one_seed_with_a_trace() {
    let (code, stdout, _) = diffuse(&["sim", "--seed", "3", "--faults", "none", "--trace"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("r0 -> r1 PrePrepare"),
        "the trace shows messages"
    );
    assert!(stdout.contains("no violations"));
}

#[test]
fn sim_rejects_unknown_names() {
    let (code, _, stderr) = diffuse(&["sim", "--faults", "bogus"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("unknown fault mix"));
    let (code, _, stderr) = diffuse(&["sim", "--mutant", "bogus", "--seeds", "1"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("unknown mutant"));
}

#[test]
fn sim_list_names_mixes_behaviours_and_mutants() {
    let (code, stdout, _) = diffuse(&["sim", "--list"]);
    assert_eq!(code, 0);
    for name in [
        "network",
        "equivocate",
        "collude",
        "garbage",
        "commit-quorum-minus-one",
    ] {
        assert!(stdout.contains(name), "--list lacks {name}");
    }
}

#[test]
fn keygen_writes_a_valid_key_file() {
    let (code, stdout, _) = diffuse(&["keygen", "--role", "client", "--id", "7"]);
    assert_eq!(code, 0);
    let file = diffuse_core::config::KeyFile::parse(&stdout).expect("a valid key file");
    assert_eq!(file.id, 7);
    let dir = std::env::temp_dir().join(format!("diffuse-keygen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("key.toml");
    let _ = std::fs::remove_file(&path);
    let path_text = path.to_str().unwrap();
    assert_eq!(diffuse(&["keygen", "--id", "0", "--out", path_text]).0, 0);
    assert_eq!(
        diffuse(&["keygen", "--id", "0", "--out", path_text]).0,
        1,
        "never overwrites a key"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sim_runs_minbft_with_its_own_default_cluster_size() {
    let (code, stdout, stderr) = diffuse(&[
        "sim",
        "--protocol",
        "minbft",
        "--seeds",
        "11",
        "--threads",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(report["violations"], 0, "{stdout}");
    assert_eq!(report["n"], 3, "MinBFT defaults to n = 3");
    let (code, stdout, _) = diffuse(&["sim", "--protocol", "minbft", "--list"]);
    assert_eq!(code, 0);
    for name in [
        "rollback",
        "withhold",
        "enclave-without-rollback-protection",
    ] {
        assert!(stdout.contains(name), "--list lacks {name}");
    }
}
