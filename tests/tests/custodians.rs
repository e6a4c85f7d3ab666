//! Anonymous callers can neither lock a custodian out of unsealing nor keep a vault from starting
//! (issue 25): unsealing takes no credential, so wrong custodian tries are paced per address
//! instead of locking the custodian, and nothing they cause is stored to refuse a later start.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::time::{Duration, Instant};

use khlang_client::Code;
use khlang_server::AuthLimits;
use khlang_server::storage::FailureRecord;
use khlang_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_custodian_tries_are_paced_per_address_and_lock_no_one_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = sealed_server(dir.path(), AuthLimits { max_failures: 3, ..Default::default() }).await;
    let url = server.url();
    let attacker = ip("127.0.0.6");
    for n in 0..3 {
        let e =
            client_from(&url, attacker, None).await.unseal(1, &format!("wrong guess {n}")).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    }
    // A flood from that address, well past the limit: paced, the excess refused, none a lockout.
    let mut flood = Vec::new();
    for n in 0..12 {
        let url = url.clone();
        flood.push(tokio::spawn(async move {
            let mut c = client_from(&url, attacker, None).await;
            c.unseal(1, &format!("flood guess {n}")).await.unwrap_err().code()
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Meanwhile the real custodian 1, from its own address, is answered at once.
    let asked = Instant::now();
    let status = client_from(&url, ip("127.0.0.9"), None).await.unseal(1, TWO_CUSTODIANS[0]).await.unwrap();
    assert_eq!(status.received, vec![1], "the right passphrase is never refused for others' failures");
    assert!(asked.elapsed() < Duration::from_secs(1), "not held back: {:?}", asked.elapsed());
    let mut codes = Vec::new();
    for t in flood {
        codes.push(t.await.unwrap());
    }
    let exhausted = codes.iter().filter(|c| **c == Some(Code::ResourceExhausted)).count();
    let denied = codes.iter().filter(|c| **c == Some(Code::PermissionDenied)).count();
    assert_eq!(exhausted + denied, codes.len(), "{codes:?}");
    // At most one paced try a second was admitted, within the few seconds a try may wait.
    assert!((1..=7).contains(&denied) && exhausted >= 5, "{codes:?}");
    // Custodian 2 from the flooding address itself is not held back: pacing is per custodian.
    let status = client_from(&url, attacker, None).await.unseal(2, TWO_CUSTODIANS[1]).await.unwrap();
    assert!(!status.sealed, "unsealed by both custodians");
    // The tries are on the record, a refused one too (repeats are counted into a summary later).
    let entries = server.audit_entries();
    let tries: Vec<_> = entries.iter().filter(|e| e.rpc == "Unseal" && e.identity == "custodian-1").collect();
    assert!(tries.len() >= 5, "three wrong, one right, one paced refusal: {} recorded", tries.len());
    assert!(tries.iter().any(|e| e.outcome == "ResourceExhausted"), "a paced refusal is recorded");
    server.stop().await;

    // A custodian lockout stored by an earlier build (or written into the store) no longer
    // refuses anything: the operator's start with passphrase files unseals, and so does a caller.
    let store = open_store(dir.path()).await;
    let locked = FailureRecord { format: 1, locked_until_ms: Some(u64::MAX / 2), ..Default::default() };
    for c in [1u8, 2] {
        store
            .put_failures(&khlang_server::vault::auth::Credential::Custodian(c).key(), &locked)
            .await
            .unwrap();
    }
    store.flush_now().await.unwrap();
    drop(store);
    let options = khlang_server::VaultOptions {
        auth: AuthLimits { max_failures: 3, ..Default::default() },
        ..TestServer::options(dir.path())
    };
    let vault = khlang_server::Vault::open_sealed(dir.path(), &options).await.unwrap();
    vault.unseal_with(1, TWO_CUSTODIANS[0].as_bytes(), None, "", "").await.unwrap();
    let server = TestServer::start_vault(dir.path(), options, vault).await;
    let status = client_from(&server.url(), attacker, None).await.unseal(2, TWO_CUSTODIANS[1]).await.unwrap();
    assert!(!status.sealed, "{status:?}");
    server.stop().await;
}
