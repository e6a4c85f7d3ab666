//! Break-glass for the two-person rule (issue 25): the last identity administrator's request is
//! approved by the custodians' quorum with `khlangd approve-identity`, only when nobody else could
//! approve it, never with a wrong passphrase, and on the record. Run on PostgreSQL by
//! `on_postgres_break_glass.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use khlang_client::Code;
use khlang_tests::*;

fn said(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_administrator_gets_a_second_one_through_the_custodians() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut admin = server.client_as("key-admin").await;
    server.second_admin().await.list_identities().await.unwrap();
    let request = admin.create_identity("new-admin", "key-admin").await.unwrap().pending().expect("pending");
    let e = admin.approve_identity(&request.id).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "nobody approves their own: {e}");
    server.stop().await;

    // While a second administrator is active, break-glass is refused: the rule can be met.
    let out = khlangd_offline(dir.path(), "approve-identity", &["--request", &request.id]);
    assert!(!out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("'key-admin-2' can approve this request"), "{}", said(&out));

    // The second administrator leaves: now nobody but the requester administers identities.
    let server = TestServer::start(dir.path()).await;
    server.client_as("key-admin").await.revoke_identity("key-admin-2").await.unwrap();
    server.stop().await;

    // A wrong passphrase opens nothing and approves nothing.
    let wrong = write_passphrase(dir.path(), "not the custodian's passphrase at all");
    let mut args = vec!["approve-identity", "--data-dir", dir.path().to_str().unwrap()];
    args.extend(["--passphrase-file", &wrong, "--request", &request.id]);
    let url = on_postgres().then(|| database_url(dir.path()));
    if let Some(url) = &url {
        args.extend(["--storage", url.as_str()]);
    }
    let out = khlangd_cmd(&args);
    assert!(!out.status.success() && said(&out).contains("cannot unseal"), "{}", said(&out));
    // An unknown request is named as such.
    let out = khlangd_offline(dir.path(), "approve-identity", &["--request", "no-such-request"]);
    assert!(!out.status.success() && said(&out).contains("not found"), "{}", said(&out));

    let out = khlangd_offline(dir.path(), "approve-identity", &["--request", &request.id]);
    assert!(out.status.success(), "{}", said(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("Token for identity 'new-admin'"), "{text}");
    let token = text.lines().last().unwrap().trim().to_owned();
    assert!(token.starts_with("khl_"), "{text}");
    // Once used, the request is closed.
    let out = khlangd_offline(dir.path(), "approve-identity", &["--request", &request.id]);
    assert!(!out.status.success(), "{}", said(&out));

    let server = TestServer::start(dir.path()).await;
    let mut second = server.client_with_token(&token).await;
    let listed = second.list_identities().await.unwrap();
    let me = listed.iter().find(|i| i.name == "new-admin").unwrap();
    assert_eq!(me.role, "key-admin");
    // The organisation has two administrators again: the ordinary rule works.
    let next = second.create_identity("third-admin", "key-admin").await.unwrap().pending().unwrap();
    server.client_as("key-admin").await.approve_identity(&next.id).await.unwrap();
    // On the record: approved by the custodians, and the refusal before it.
    let entries = server.audit_entries();
    let glass: Vec<_> =
        entries.iter().filter(|e| e.rpc == "ApproveIdentity" && e.identity == "custodians").collect();
    assert!(glass.iter().any(|e| e.outcome == "Ok" && e.reason.contains("break-glass")), "{glass:?}");
    assert!(glass.iter().any(|e| e.outcome == "FailedPrecondition"), "{glass:?}");
    assert!(!format!("{entries:?}").contains(&token[4..]), "no token in the log");
    server.stop().await;
}
