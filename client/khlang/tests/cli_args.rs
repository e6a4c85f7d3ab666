//! The `khlang` binary's own argument handling (no server needed).
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::process::Command;

fn khlang() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_khlang"));
    c.env_remove("KHLANG_TOKEN").env_remove("KHLANG_ADDR");
    c
}

#[test]
fn help_lists_every_subcommand() {
    let out = khlang().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for sub in ["put", "get", "update", "delete", "list", "bench"] {
        assert!(text.contains(sub), "--help should list '{sub}':\n{text}");
    }
}

#[test]
fn missing_token_is_a_clear_error() {
    let out = khlang().args(["get", "00000000-0000-4000-8000-000000000000"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KHLANG_TOKEN"));
}

#[test]
fn malformed_field_assignment_is_refused() {
    let out =
        khlang().args(["put", "--subject", "s", "card_number"]).env("KHLANG_TOKEN", "t").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FIELD=VALUE"));
}

#[test]
fn unreachable_vault_is_a_clear_error() {
    let out = khlang()
        .args(["--addr", "http://127.0.0.1:1", "list", "--subject", "s"])
        .env("KHLANG_TOKEN", "t")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to http://127.0.0.1:1"));
}
