//! Rekeying under dual control, as an attacker holding the key admin's token would try it: the
//! ceremony binds each new share to a named identity, approvals need the current custodians, and
//! an abandoned ceremony expires. Run on PostgreSQL by `on_postgres_rekey.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use khlang_client::Code;
use khlang_tests::*;

const THREE: [&str; 3] =
    ["custodian one: mango sticky rice", "custodian two: tom yum goong", "custodian three: som tam thai"];

/// One key admin cannot rekey the vault alone: starting a ceremony changes nothing; each new
/// share is bound to a named identity (all different, active, never the admin), and only that
/// identity, with its own token, sets its passphrase, once (the admin, another holder or a caller
/// without a token is refused); the status names each share's holder for the approvers; approvals
/// need the current custodians' passphrases, only after every new share is sealed, as many as
/// unsealing needs (one custodian twice counts once); a wrong nonce is refused; a cancelled
/// ceremony leaves the old custodians unsealing; nothing secret reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_admin_cannot_rekey_alone() {
    let dir = tempfile::tempdir().unwrap();
    let options = TestServer::options(dir.path());
    let passes: Vec<&[u8]> = THREE.iter().map(|p| p.as_bytes()).collect();
    let vault = khlang_server::Vault::init_custodians(
        dir.path(),
        2,
        &passes,
        khlang_keys::SealParams::MINIMUM,
        &options,
    )
    .await
    .unwrap();
    vault.unseal_with(1, THREE[0].as_bytes(), None, "", "").await.unwrap();
    vault.unseal_with(2, THREE[1].as_bytes(), None, "", "").await.unwrap();
    let server = TestServer::start_vault(dir.path(), options, vault).await;
    let mut admin = server.client_as("key-admin").await;
    let mut anon = khlang_client::Client::connect_with(&server.url(), None, None).await.unwrap();

    // The admin cannot hold a share itself, name one identity twice, or name one that is not.
    for (holders, says) in [
        (["key-admin", "security-officer"], "cannot hold a new share"),
        (["security-officer", "security-officer"], "named for two shares"),
        (["security-officer", "nobody-by-that-name"], "not an active identity"),
    ] {
        let e = admin.rekey(2, &holders).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{holders:?}: {e}");
        assert!(e.to_string().contains(says), "{e}");
    }
    let holders = ["security-officer", "data-protection-officer"];
    let started = admin.rekey(2, &holders).await.unwrap();
    let nonce = started.nonce.clone().unwrap();
    let nonce = nonce.expose_secret().to_owned();
    let progress = anon.seal_status().await.unwrap().rekey.unwrap();
    assert!(progress.nonce.is_none(), "the status never shows the nonce");
    assert_eq!((progress.custodians, progress.approvals_needed), (2, 2));
    let bound: Vec<_> = progress.slots.iter().map(|s| (s.custodian, s.holder.as_str(), s.set)).collect();
    assert_eq!(bound, vec![(1, holders[0], false), (2, holders[1], false)], "approvers see who holds what");
    assert_eq!(
        admin.rekey(2, &holders).await.unwrap_err().code(),
        Some(Code::FailedPrecondition),
        "one ceremony at a time"
    );

    // The attack: the admin, holding the nonce, sets the new passphrases itself.
    let mine = "the admin's chosen passphrase";
    let e = admin.rekey_passphrase(&nonce, 1, mine).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "bound to another identity: {e}");
    let e = anon.rekey_passphrase(&nonce, 1, mine).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Unauthenticated), "no token, no share: {e}");
    let mut first = server.client_as(holders[0]).await;
    let mut second = server.client_as(holders[1]).await;
    let e = first.rekey_passphrase(&nonce, 2, "the first holder's try at slot two").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "one holder, one share: {e}");
    let e =
        first.rekey_passphrase("0".repeat(32).as_str(), 1, "the first holder's own one").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "wrong nonce: {e}");
    first.rekey_passphrase(&nonce, 1, "the first holder's own one").await.unwrap();
    let e = first.rekey_passphrase(&nonce, 1, "another one for slot one").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "a slot is set once: {e}");
    let e = anon.rekey_approve(&nonce, 1, THREE[0]).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "approvals wait for every new share: {e}");
    assert_eq!(
        second.rekey_passphrase(&nonce, 3, "new custodian three").await.unwrap_err().code(),
        Some(Code::InvalidArgument)
    );
    let s = second.rekey_passphrase(&nonce, 2, "the second holder's own one").await.unwrap();
    assert!(s.slots.iter().all(|s| s.set), "{s:?}");

    // Approvals need the current custodians.
    let e = anon.rekey_approve(&nonce, 1, "a guess at custodian one").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    let s = anon.rekey_approve(&nonce, 1, THREE[0]).await.unwrap();
    let s2 = anon.rekey_approve(&nonce, 1, THREE[0]).await.unwrap();
    assert_eq!(
        (s.done, s2.done, s2.approved.clone()),
        (false, false, vec![1]),
        "one custodian twice counts once"
    );
    let cancelled = admin.rekey_cancel().await.unwrap();
    assert!(!cancelled.done);
    assert!(anon.seal_status().await.unwrap().rekey.is_none());
    let e = anon.rekey_approve(&nonce, 2, THREE[1]).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "a cancelled ceremony cannot complete: {e}");

    // Nothing changed: the old custodians still unseal; the new holders' passphrases do not.
    assert!(admin.seal().await.unwrap().sealed);
    let e = anon.unseal(1, "the first holder's own one").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied));
    anon.unseal(1, THREE[0]).await.unwrap();
    assert!(!anon.unseal(3, THREE[2]).await.unwrap().sealed);

    let entries = server.audit_entries();
    let all = format!("{entries:?}");
    for secret in [nonce.as_str(), mine, THREE[0], THREE[1]] {
        assert!(!all.contains(secret), "a secret reached the audit log");
    }
    let outcomes: Vec<(String, String)> = entries
        .iter()
        .filter(|e| e.rpc.starts_with("Rekey"))
        .map(|e| (e.rpc.clone(), e.outcome.as_str().to_owned()))
        .collect();
    for (rpc, outcome) in [
        ("Rekey", "Ok"),
        ("Rekey", "FailedPrecondition"),
        ("Rekey", "InvalidArgument"),
        ("RekeyPassphrase", "PermissionDenied"),
        ("RekeyPassphrase", "Unauthenticated"),
        ("RekeyPassphrase", "FailedPrecondition"),
        ("RekeyPassphrase", "InvalidArgument"),
        ("RekeyApprove", "FailedPrecondition"),
        ("RekeyApprove", "PermissionDenied"),
        ("RekeyApprove", "Ok"),
        ("RekeyCancel", "Ok"),
    ] {
        assert!(outcomes.iter().any(|(r, o)| r == rpc && o == outcome), "{rpc} {outcome}: {outcomes:?}");
    }
    server.stop().await;
}

/// A rekey ceremony left unfinished expires: its nonce then opens nothing, the status no longer
/// shows it, and a new ceremony can start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_rekey_ceremony_expires() {
    let dir = tempfile::tempdir().unwrap();
    let options = khlang_server::VaultOptions {
        rekey_ttl: std::time::Duration::from_millis(300),
        ..TestServer::options(dir.path())
    };
    let server = TestServer::start_with(dir.path(), options).await;
    let mut admin = server.client_as("key-admin").await;
    let mut anon = khlang_client::Client::connect_with(&server.url(), None, None).await.unwrap();
    let nonce = admin.rekey(1, &["security-officer"]).await.unwrap().nonce.unwrap();
    assert!(anon.seal_status().await.unwrap().rekey.is_some());
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let mut holder = server.client_as("security-officer").await;
    let e = holder.rekey_passphrase(nonce.expose_secret(), 1, "a passphrase set too late").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
    assert!(e.to_string().contains("no rekey ceremony is in progress"), "{e}");
    assert!(anon.seal_status().await.unwrap().rekey.is_none());
    admin.rekey(1, &["security-officer"]).await.unwrap();
    server.stop().await;
}
