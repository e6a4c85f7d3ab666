//! The custodians' and key admin's command lines end to end: `khlangd init` with custodians,
//! `khlang operator unseal`, key rotation watched, retirement, and a rekey ceremony whose new
//! shares are set by the identities they are bound to.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::process::Command;

use khlang_tests::*;

/// The custodians' and key admin's command lines: init with 2-of-3 custodians, serve sealed,
/// unseal with `khlang operator unseal`, rotate, watch the rewrap, retire.
#[test]
fn custodians_and_key_admin_on_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    let data_s = data.to_str().unwrap();
    let passes: Vec<String> =
        ["first custodian's phrase", "second custodian's phrase!", "third custodian's phrase!!"]
            .iter()
            .map(|p| write_passphrase(tmp.path(), p))
            .collect();
    let mut init = vec!["init", "--data-dir", data_s, "--custodians", "3", "--threshold", "2"];
    init.extend(["--argon2-memory-kib", "19456", "--argon2-passes", "2"]);
    // Two administrators, and the two identities that will hold the new shares of the rekey.
    for name in ["admin", "holder-a", "holder-b", "admin-2"] {
        init.extend(["--initial-identity", name]);
    }
    for p in &passes {
        init.extend(["--passphrase-file", p.as_str()]);
    }
    let out = stdout(&Command::new(bin("khlangd")).args(&init).output().unwrap());
    assert!(out.contains("split among 3 custodians; any 2 unseal it"), "{out}");
    let token = out.lines().last().unwrap().trim().to_owned();
    let token_of = |name: &str| {
        let said = format!("Token for identity '{name}'");
        let mut lines = out.lines().skip_while(|l| !l.starts_with(&said));
        lines.nth(1).unwrap_or_else(|| panic!("no token for {name}: {out}")).trim().to_owned()
    };
    // A threshold of 1 with several custodians would be no dual control: refused.
    let bad = Command::new(bin("khlangd"))
        .args([
            "init",
            "--data-dir",
            tmp.path().join("x").to_str().unwrap(),
            "--custodians",
            "2",
            "--threshold",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    // One custodian's passphrase at start: serving, sealed.
    let second = format!("2={}", passes[1]);
    let (mut child, url) = spawn_khlangd(&[
        "serve",
        "--data-dir",
        data_s,
        "--listen",
        "127.0.0.1:0",
        "--passphrase-file",
        &second,
    ]);
    let url = url.unwrap();
    let status = stdout(&khlang_anon(&url, &["operator", "status"]));
    assert!(status.starts_with("SEALED: 1 of 2 needed custodians' shares given (custodians: 2;"), "{status}");
    let refused = khlang(&url, &token, &["keys", "status"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("FailedPrecondition"), "sealed");
    let wrong =
        khlang_anon(&url, &["operator", "unseal", "--custodian", "3", "--passphrase-file", &passes[0]]);
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong passphrase for custodian 3's share"));
    let unsealed = stdout(&khlang_anon(
        &url,
        &["operator", "unseal", "--custodian", "3", "--passphrase-file", &passes[2]],
    ));
    assert!(unsealed.starts_with("unsealed"), "{unsealed}");

    let table = stdout(&khlang(&url, &token, &["keys", "status"]));
    assert!(
        table.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()[..3] == ["1", "active", "0m"]),
        "{table}"
    );
    stdout(&khlang(&url, &token, &["keys", "rotate"]));
    let watched = khlang(&url, &token, &["keys", "status", "--watch", "--json"]);
    let progress = String::from_utf8_lossy(&watched.stderr).into_owned();
    assert!(progress.contains("rewrap to v2") && progress.contains("100.0%"), "{progress}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&watched)).unwrap();
    assert_eq!(json["versions"][0]["state"], "decrypt-only");
    assert_eq!(json["versions"][1]["state"], "active");
    assert!(json["job"]["finished_ms"].as_u64().unwrap() > 0, "{json}");
    assert_eq!(
        stdout(&khlang(&url, &token, &["keys", "retire", "1"])).trim(),
        "KEK v1 retired: destroyed, no data key referenced it"
    );
    let table = stdout(&khlang(&url, &token, &["keys", "status"]));
    assert!(table.lines().any(|l| l.trim_start().starts_with("1  retired")), "{table}");

    // Rekey on the command line: the key admin starts, naming the identity that holds each new
    // share; each sets their own passphrase with their own token; two current custodians approve.
    let rekey = ["operator", "rekey", "--holder", "holder-a", "--holder", "holder-b", "--threshold", "2"];
    let nonce = stdout(&khlang(&url, &token, &rekey));
    let nonce = nonce.trim();
    assert_eq!(nonce.len(), 32, "{nonce}");
    let fresh = [
        write_passphrase(tmp.path(), "new custodian A: khao pad"),
        write_passphrase(tmp.path(), "new custodian B: pad thai"),
    ];
    let set_with = |token: &str, n: &str, file: &str| {
        khlang(
            &url,
            token,
            &["operator", "rekey-passphrase", "--nonce", nonce, "--custodian", n, "--passphrase-file", file],
        )
    };
    // The admin who started it cannot set a share, nor can a holder set another's.
    let refused = set_with(&token, "1", &fresh[0]);
    assert!(!refused.status.success(), "the admin sets no share");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("bound to another identity"), "{refused:?}");
    assert!(!set_with(&token_of("holder-b"), "1", &fresh[0]).status.success(), "holder-b sets no share 1");
    let status = stdout(&khlang_anon(&url, &["operator", "status"]));
    assert!(status.contains("new custodian 1: holder-a (waiting)"), "approvers see the holders: {status}");
    for (j, (holder, file)) in ["holder-a", "holder-b"].iter().zip(&fresh).enumerate() {
        let set = set_with(&token_of(holder), &(j + 1).to_string(), file);
        assert!(set.status.success(), "{set:?}");
    }
    let status = stdout(&khlang_anon(&url, &["operator", "status"]));
    assert!(status.contains("rekey in progress") && status.contains("new passphrases set: 1, 2"), "{status}");
    assert!(status.contains("new custodian 2: holder-b (passphrase set)"), "{status}");
    let first = stdout(&khlang_anon(
        &url,
        &["operator", "rekey-approve", "--nonce", nonce, "--custodian", "1", "--passphrase-file", &passes[0]],
    ));
    assert!(first.contains("approvals: 1 of 2 needed: 1"), "{first}");
    let done = stdout(&khlang_anon(
        &url,
        &["operator", "rekey-approve", "--nonce", nonce, "--custodian", "3", "--passphrase-file", &passes[2]],
    ));
    assert!(done.starts_with("rekey done"), "{done}");

    let sealed = stdout(&khlang(&url, &token, &["operator", "seal"]));
    assert!(
        sealed.starts_with("SEALED: 0 of 2 needed custodians' shares given (custodians: none yet; 2 in all)"),
        "{sealed}"
    );
    stdout(&khlang_anon(&url, &["operator", "unseal", "--custodian", "1", "--passphrase-file", &fresh[0]]));
    let unsealed = stdout(&khlang_anon(
        &url,
        &["operator", "unseal", "--custodian", "2", "--passphrase-file", &fresh[1]],
    ));
    assert!(unsealed.starts_with("unsealed"), "the new custodians unseal: {unsealed}");
    child.kill().unwrap();
    child.wait().unwrap();
}
