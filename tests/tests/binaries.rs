//! The real binaries: `khlang` against a server, and `khlangd` init / serve / dev across restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::io::{BufRead, Read};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use khlang_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (url, token) = (server.url(), server.token.clone());
    let out = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| khlang(&url, &token, args);
        let id = stdout(&run(&[
            "put",
            "--subject",
            "cli-subject",
            &format!("card_number={CANARY_CARD}"),
            &format!("name={CANARY_NAME_TH}"),
            &format!("email={CANARY_EMAIL}"),
        ]))
        .trim()
        .to_owned();
        assert_eq!(id.len(), 36, "a record id: {id}");

        let json: serde_json::Value =
            serde_json::from_str(&stdout(&run(&["get", &id, "--json", "--purpose", "service_delivery"])))
                .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"card_number": CANARY_CARD, "name": CANARY_NAME_TH, "email": CANARY_EMAIL})
        );
        let subset: serde_json::Value = serde_json::from_str(&stdout(&run(&[
            "get",
            &id,
            "--fields",
            "email",
            "--json",
            "--purpose",
            "service_delivery",
        ])))
        .unwrap();
        assert_eq!(subset, serde_json::json!({"email": CANARY_EMAIL}));
        let table = stdout(&run(&["get", &id, "--purpose", "service_delivery"]));
        assert!(table.lines().any(|l| l.starts_with("card_number") && l.ends_with(CANARY_CARD)), "{table}");

        assert_eq!(
            stdout(&run(&["update", &id, "postal_code=80000", "--remove", "email"])).trim(),
            "card_number,name,postal_code"
        );
        let listed: serde_json::Value =
            serde_json::from_str(&stdout(&run(&["list", "--subject", "cli-subject", "--json"]))).unwrap();
        assert_eq!(
            listed,
            serde_json::json!([{"record_id": id, "fields": ["card_number", "name", "postal_code"]}])
        );

        // Errors: status code and message on stderr, non-zero exit.
        let bad = run(&["put", "--subject", "cli-subject", "cvv=123"]);
        assert!(!bad.status.success());
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains("InvalidArgument") && err.contains("PCI DSS 3.3.1"), "{err}");
        let unauth = khlang(&url, "khl_wrong", &["get", &id]);
        assert!(!unauth.status.success());
        assert!(String::from_utf8_lossy(&unauth.stderr).contains("Unauthenticated"));

        assert!(stdout(&run(&["delete", &id])).contains("deleted"));
        let gone = run(&["get", &id, "--purpose", "service_delivery"]);
        assert!(!gone.status.success());
        assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
        true
    })
    .await
    .unwrap();
    assert!(out);
    server.stop().await;
}

/// A stored value cannot fake another field's line or reorder the table the CLI prints: newlines
/// are escaped and bidi overrides and zero-width characters dropped (JSON keeps the value as is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_text_output_cannot_be_faked_by_a_stored_value() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let forged = "1 Main St\nemail     root@evil.example\u{202e}moc.elpmaxe\u{200b}";
    let id = server.client().await.put("cli-fake", [("home_address", forged)]).await.unwrap();
    let (url, token) = (server.url(), server.token.clone());
    let text = tokio::task::spawn_blocking(move || {
        stdout(&khlang(&url, &token, &["get", &id, "--purpose", "service_delivery"]))
    })
    .await
    .unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains("1 Main St\\nemail") && !text.contains('\u{202e}') && !text.contains('\u{200b}'),
        "{text}"
    );
    server.stop().await;
}

#[test]
fn khlangd_init_serve_kill_restart_and_wrong_passphrase() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    let data_s = data.to_str().unwrap();
    let good = write_passphrase(tmp.path(), "municipal custodians' long passphrase");
    let bad = write_passphrase(tmp.path(), "not it");
    let regs_path = tmp.path().join("regulations.toml");
    std::fs::write(&regs_path, test_regulations()).unwrap();
    let regs = regs_path.to_str().unwrap();

    let init = Command::new(bin("khlangd"))
        .args([
            "init",
            "--data-dir",
            data_s,
            "--passphrase-file",
            &good,
            "--argon2-memory-kib",
            "19456",
            "--argon2-passes",
            "2",
            "--regulations",
            regs,
            "--initial-identity",
            "tester",
            "--initial-role",
            "tester",
        ])
        .output()
        .unwrap();
    let init_out = stdout(&init);
    let token = init_out.lines().last().unwrap().trim().to_owned();
    assert!(token.starts_with("khl_"), "{init_out}");
    // Initialising twice is refused and keeps the vault.
    let again = Command::new(bin("khlangd"))
        .args(["init", "--data-dir", data_s, "--passphrase-file", &good])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already initialised"));
    // Parameters below the floor are refused.
    let weak_dir = tmp.path().join("weak");
    let weak = Command::new(bin("khlangd"))
        .args([
            "init",
            "--data-dir",
            weak_dir.to_str().unwrap(),
            "--passphrase-file",
            &good,
            "--argon2-memory-kib",
            "1024",
        ])
        .output()
        .unwrap();
    assert!(!weak.status.success());
    assert!(String::from_utf8_lossy(&weak.stderr).contains("below the minimum"));

    let serve = [
        "serve",
        "--data-dir",
        data_s,
        "--listen",
        "127.0.0.1:0",
        "--passphrase-file",
        &good,
        "--regulations",
        regs,
    ];
    let (mut child, url) = spawn_khlangd(&serve);
    let url = url.unwrap();
    let id = stdout(&khlang(
        &url,
        &token,
        &["put", "--subject", "restart", &format!("card_number={CANARY_CARD}")],
    ))
    .trim()
    .to_owned();
    // kill -9 right after the acknowledgement: an acknowledged write is already durable.
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, url) = spawn_khlangd(&serve);
    let url = url.unwrap();
    let json: serde_json::Value = serde_json::from_str(&stdout(&khlang(
        &url,
        &token,
        &["get", &id, "--json", "--purpose", "service_delivery"],
    )))
    .unwrap();
    assert_eq!(json["card_number"], CANARY_CARD);
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, result) =
        spawn_khlangd(&["serve", "--data-dir", data_s, "--listen", "127.0.0.1:0", "--passphrase-file", &bad]);
    let status = child.wait().unwrap();
    assert!(!status.success(), "a wrong passphrase must stop the server");
    let log = result.unwrap_err();
    assert!(log.contains("wrong passphrase"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn khlangd_dev_writes_credentials_and_reuses_its_folder() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let args = ["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()];
    let creds_path = data.join("dev-credentials.json");

    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let mode = std::fs::metadata(&creds_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let creds: serde_json::Value = serde_json::from_slice(&std::fs::read(&creds_path).unwrap()).unwrap();
    assert_eq!(
        creds.as_object().unwrap().len(),
        9,
        "one identity per sample role and a second key admin: {creds}"
    );
    // The two-person rule works out of the box: one key admin requests, the other approves.
    let admin = creds["key-admin"].as_str().unwrap();
    let request = stdout(&khlang(&url, admin, &["identity", "create", "clerk-2", "--role", "billing-clerk"]));
    let approved =
        khlang(&url, creds["key-admin-2"].as_str().unwrap(), &["identity", "approve", request.trim()]);
    assert!(stdout(&approved).trim().starts_with("khl_"), "{approved:?}");
    let token = creds["registration-app"].as_str().unwrap().to_owned();
    let id =
        stdout(&khlang(&url, &token, &["put", "--subject", "dev", "postal_code=80000"])).trim().to_owned();
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let creds2: serde_json::Value = serde_json::from_slice(&std::fs::read(&creds_path).unwrap()).unwrap();
    assert_eq!(creds2, creds, "valid tokens are reused");
    // The registration app reads masked: the record is there, its postal code is not shown.
    let shown = stdout(&khlang(&url, &token, &["get", &id, "--purpose", "contact"]));
    assert!(shown.contains("postal_code") && shown.contains("***") && !shown.contains("80000"), "{shown}");
    // A sample identity revoked: the next start goes on without it and says so.
    let admin = creds2["key-admin"].as_str().unwrap().to_owned();
    stdout(&khlang(&url, &admin, &["identity", "revoke", "marketing-officer"]));
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, url, log) = spawn_khlangd_logged(&args, "info");
    url.unwrap();
    let creds3: serde_json::Value = serde_json::from_slice(&std::fs::read(&creds_path).unwrap()).unwrap();
    assert!(creds3.get("marketing-officer").is_none(), "{creds3}");
    assert_eq!(creds3["registration-app"], creds2["registration-app"]);
    child.kill().unwrap();
    child.wait().unwrap();
    let logged = log.recv_timeout(Duration::from_secs(10)).unwrap().unwrap_err();
    assert!(
        logged.contains("development identity was revoked") && logged.contains("marketing-officer"),
        "{logged}"
    );
}

#[test]
fn khlangd_reloads_regulations_on_sighup_and_keeps_them_when_invalid() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let regs_path = tmp.path().join("regulations.toml");
    std::fs::write(&regs_path, khlang_server::policy::regulations::SAMPLE).unwrap();
    let args = [
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--regulations",
        regs_path.to_str().unwrap(),
    ];
    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let creds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("dev-credentials.json")).unwrap()).unwrap();
    let admin = creds["key-admin"].as_str().unwrap().to_owned();
    let version = || -> String {
        let out = stdout(&khlang(&url, &admin, &["regulations", "show", "--json"]));
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["version"].as_str().unwrap().to_owned()
    };
    let hup = |pid: u32| {
        assert!(Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
        std::thread::sleep(Duration::from_millis(500));
    };
    let v1 = version();

    std::fs::write(&regs_path, "[regulations]\norganisation = 'broken: no fields'\n").unwrap();
    hup(child.id());
    assert_eq!(version(), v1, "an invalid file is refused and the rules in force stay");

    let changed = format!("{}\n# amended\n", khlang_server::policy::regulations::SAMPLE);
    std::fs::write(&regs_path, &changed).unwrap();
    hup(child.id());
    let v2 = version();
    assert_ne!(v2, v1);
    assert_eq!(v2, khlang_server::policy::regulations::Regulations::parse(&changed).unwrap().version);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn plaintext_is_refused_off_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin("khlangd"))
        .args(["dev", "--listen", "0.0.0.0:0", "--data-dir", tmp.path().join("d").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing plaintext on 0.0.0.0:0"));
}

#[test]
fn audit_cli_and_no_personal_data_in_the_server_log() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let witness = tmp.path().join("witness.jsonl");
    let witness_s = witness.to_str().unwrap();
    let (mut child, url, log) = spawn_khlangd_logged(
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--audit-witness",
            witness_s,
        ],
        "debug",
    );
    let url = url.unwrap();
    let creds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("dev-credentials.json")).unwrap()).unwrap();
    let tok = |who: &str| creds[who].as_str().unwrap().to_owned();

    let app = tok("registration-app");
    let mut put = vec!["put", "--subject", "canary-person"];
    let fields: Vec<String> = canary_fields().iter().map(|(k, v)| format!("{k}={v}")).collect();
    put.extend(fields.iter().map(String::as_str));
    let id = stdout(&khlang(&url, &app, &put)).trim().to_owned();
    stdout(&khlang(&url, &app, &["get", &id, "--purpose", "contact"]));
    let clerk = tok("billing-clerk");
    stdout(&khlang(&url, &clerk, &["get", &id, "--fields", "card_number", "--purpose", "billing"]));
    assert!(
        !khlang(&url, &clerk, &["get", &id, "--fields", "name", "--purpose", "billing"]).status.success()
    );
    assert!(!khlang(&url, &app, &["put", "--subject", "x", "card_number=4111111111111112"]).status.success());

    let sec = tok("security-officer");
    let report = stdout(&khlang(&url, &sec, &["audit", "subject", "canary-person", "--json"]));
    let rows: Vec<serde_json::Value> = report.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(rows.iter().any(|r| r["identity"] == "billing-clerk" && r["decision"] == "allow"), "{report}");
    assert!(rows.iter().any(|r| r["identity"] == "billing-clerk" && r["decision"] == "deny"), "{report}");
    let table = stdout(&khlang(&url, &sec, &["audit", "query", "--identity", "billing-clerk"]));
    assert!(table.lines().count() >= 3, "{table}");
    assert!(stdout(&khlang(&url, &sec, &["audit", "verify"])).contains("intact"));
    // Every signed checkpoint also went to the witness outside the data folder.
    let witnessed = std::fs::read_to_string(&witness).unwrap();
    let signed = std::fs::read_to_string(data.join("audit").join("checkpoints.log")).unwrap();
    assert!(witnessed.lines().count() >= 1);
    assert!(witnessed.lines().all(|w| signed.contains(w)), "{witnessed}");
    assert!(stdout(&khlang(&url, &sec, &["audit", "verify", "--witness", witness_s])).contains("intact"));
    let key = stdout(&khlang(&url, &sec, &["audit", "public-key"])).trim().to_owned();
    let export = tmp.path().join("audit.jsonl");
    let out = khlang(&url, &sec, &["audit", "export", "--output", export.to_str().unwrap()]);
    assert!(out.status.success());
    // The app may not read the audit log.
    assert!(
        String::from_utf8_lossy(&khlang(&url, &app, &["audit", "query"]).stderr).contains("PermissionDenied")
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let server_log = log.recv_timeout(Duration::from_secs(10)).unwrap().unwrap_err();

    // Offline verification needs no server, only the key; an edited export fails it.
    let offline = |file: &std::path::Path, key: &str| {
        Command::new(bin("khlang"))
            .args(["audit", "verify", "--offline", file.to_str().unwrap(), "--public-key", key])
            .env_remove("KHLANG_TOKEN")
            .output()
            .unwrap()
    };
    // The export was taken before the last checkpoint; it verifies as far as its own checkpoints.
    assert!(
        offline(&export, &key).status.success(),
        "{}",
        String::from_utf8_lossy(&offline(&export, &key).stderr)
    );
    let text = std::fs::read_to_string(&export).unwrap();
    let edited = tmp.path().join("edited.jsonl");
    std::fs::write(&edited, text.replacen("\"decision\":\"deny\"", "\"decision\":\"allow\"", 1)).unwrap();
    let bad = offline(&edited, &key);
    assert_eq!(bad.status.code(), Some(2), "broken exits 2");
    assert!(String::from_utf8_lossy(&bad.stdout).contains("BROKEN"));
    // Without its checkpoints nothing is proven: unverified, exit 3, never "intact".
    let unsigned = tmp.path().join("unsigned.jsonl");
    let kept: Vec<&str> = text.lines().filter(|l| !l.contains("\"type\":\"checkpoint\"")).collect();
    std::fs::write(&unsigned, kept.join("\n")).unwrap();
    let unverified = offline(&unsigned, &key);
    assert_eq!(unverified.status.code(), Some(3), "unverified exits 3");
    assert!(String::from_utf8_lossy(&unverified.stdout).contains("UNVERIFIED"));
    // A format this verifier does not know is refused, not guessed at.
    let future = tmp.path().join("future.jsonl");
    std::fs::write(&future, text.replacen("khlang-audit-2", "khlang-audit-9", 1)).unwrap();
    let refused = offline(&future, &key);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not an audit export of a known format"));
    // Offline against the witness too: every head it holds is in the export (the export signed
    // the head it ends at, and the daemon was killed before signing another).
    let with_witness = Command::new(bin("khlang"))
        .args(["audit", "verify", "--offline", export.to_str().unwrap(), "--public-key", &key])
        .args(["--witness", witness_s])
        .output()
        .unwrap();
    assert_eq!(with_witness.status.code(), Some(0), "{}", String::from_utf8_lossy(&with_witness.stdout));

    for canary in
        [CANARY_CARD, CANARY_NAME_TH, CANARY_ADDRESS_TH, CANARY_EMAIL, "canary-person", "4111111111111112"]
    {
        assert!(!server_log.contains(canary), "the server log holds '{canary}'");
        assert!(!text.contains(canary), "the audit export holds '{canary}'");
    }
    assert!(server_log.contains("serving khlang.v1"), "the log was captured");
}

/// Pseudo-random milliseconds in `lo..hi` (no RNG crate needed for test timing).
fn jitter_ms(lo: u64, hi: u64) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    lo + u64::from(nanos) % (hi - lo)
}

/// kill -9 during the rewrap, at random points, several times: after each restart the job resumes
/// from its last committed step; at the end every data key was rewrapped exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_survives_kill_9_at_random_points_and_counts_exactly() {
    const RECORDS: usize = 400;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let data_s = data.to_str().unwrap().to_owned();
    // Small paced steps so kills land mid-job.
    let args = [
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_s,
        "--key-job-batch",
        "8",
        "--key-job-pause-ms",
        "15",
    ];
    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let mut app = khlang_client::Client::connect(&url, &dev_token(&data, "registration-app")).await.unwrap();
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..RECORDS {
        let subject = format!("kill-{}", i % 8);
        let email = format!("person{i}@example.go.th");
        let id = app.put(&subject, [("email", email.clone())]).await.unwrap();
        expected.insert(id, (subject, email));
    }
    let mut admin = khlang_client::Client::connect(&url, &dev_token(&data, "key-admin")).await.unwrap();
    admin.rotate_key().await.unwrap();

    let mut last_done = 0;
    let mut kills_mid_job = 0;
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(jitter_ms(40, 250))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let (next, url) = spawn_khlangd(&args);
        child = next;
        let url = url.unwrap();
        admin = khlang_client::Client::connect(&url, &dev_token(&data, "key-admin")).await.unwrap();
        let job = admin.key_status(false).await.unwrap().job.unwrap();
        assert!(job.done() >= last_done, "round {round}: progress went back: {job:?}");
        assert!(job.changed <= RECORDS as u64, "round {round}: {job:?}");
        if job.finished_ms.is_none() {
            kills_mid_job += 1;
        }
        last_done = job.done();
    }
    assert!(kills_mid_job >= 2, "only {kills_mid_job} kills landed during the job");
    let status = loop {
        let k = admin.key_status(false).await.unwrap();
        if k.job.as_ref().unwrap().finished_ms.is_some() {
            break admin.key_status(true).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let job = status.job.clone().unwrap();
    assert_eq!(
        (job.changed, job.skipped, job.total),
        (RECORDS as u64, 0, RECORDS as u64),
        "every data key rewrapped exactly once"
    );
    let per_version: Vec<_> = status.versions.iter().map(|v| (v.version, v.data_keys)).collect();
    assert_eq!(per_version, [(1, Some(0)), (2, Some(RECORDS as u64))]);
    // Every record readable with its value (the data-protection officer exports in full).
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let mut dpo =
        khlang_client::Client::connect(&url, &dev_token(&data, "data-protection-officer")).await.unwrap();
    let mut seen = 0;
    for s in 0..8 {
        for r in dpo.export_subject(&format!("kill-{s}")).await.unwrap() {
            let (subject, email) = &expected[&r.record_id];
            assert_eq!(r.subject_id.expose_secret(), subject);
            assert_eq!(r.fields["email"].expose_secret(), email);
            seen += 1;
        }
    }
    assert_eq!(seen, RECORDS);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A read is answered only once its audit entry is on disk: kill -9 right after the last of 300,
/// and every one of them is still on the record, the chain intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_reads_survive_kill_9_in_the_audit_log() {
    const READS: usize = 300;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let args = ["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()];
    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let mut app = khlang_client::Client::connect(&url, &dev_token(&data, "registration-app")).await.unwrap();
    let id = app.put("journal", [("email", CANARY_EMAIL)]).await.unwrap();
    for _ in 0..READS {
        app.get(&id, &[], Some("contact")).await.unwrap();
    }
    child.kill().unwrap(); // SIGKILL, straight after the last acknowledgement
    child.wait().unwrap();

    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let mut sec = khlang_client::Client::connect(&url, &dev_token(&data, "security-officer")).await.unwrap();
    let q = khlang_client::AuditQuery { identity: "registration-app".into(), ..Default::default() };
    let reads = sec.query_audit(&q).await.unwrap().iter().filter(|e| e.rpc == "GetRecord").count();
    assert_eq!(reads, READS, "every acknowledged read is in the log");
    let report = sec.verify_audit(&[]).await.unwrap().report;
    assert!(report.first_break.is_none(), "{report:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `khlangd archive-audit` runs on a stopped vault and never removes what the retention keeps.
#[test]
fn archive_audit_command_keeps_what_the_retention_keeps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let data_s = data.to_str().unwrap();
    let (mut child, url) = spawn_khlangd(&["dev", "--listen", "127.0.0.1:0", "--data-dir", data_s]);
    url.unwrap();
    // While it runs, the folder is locked: archival refuses.
    let pass = write_passphrase(tmp.path(), khlang_server::dev::DEV_PASSPHRASE);
    let out = tmp.path().join("archive.jsonl");
    let archive = |days: &str| {
        Command::new(bin("khlangd"))
            .args([
                "archive-audit",
                "--data-dir",
                data_s,
                "--passphrase-file",
                &pass,
                "--older-than-days",
                days,
            ])
            .args(["--output", out.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let locked = archive("400");
    assert!(!locked.status.success());
    assert!(String::from_utf8_lossy(&locked.stderr).contains("is it still running?"));
    child.kill().unwrap();
    child.wait().unwrap();

    let young = archive("30");
    assert!(!young.status.success());
    assert!(String::from_utf8_lossy(&young.stderr).contains("entries younger than 365 days are kept"));
    assert!(!out.exists(), "a refused archival leaves no file behind");
    let none = archive("400");
    assert_eq!(stdout(&none).trim(), "nothing to archive: no signed checkpoint is older than 400 days");
    assert!(!out.exists());
}

/// `khlangd dev` restarts after its custodian changed the development passphrase: it cannot
/// unseal itself, so it serves sealed, says so, and unseals with the new passphrase.
#[test]
fn khlangd_dev_restarts_sealed_after_its_passphrase_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let args = ["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()];
    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let new_pass = "a passphrase only this custodian knows";
    let change = tmp.path().join("change");
    std::fs::write(&change, format!("{}\n{new_pass}\n", khlang_server::dev::DEV_PASSPHRASE)).unwrap();
    let changed = khlang_anon(&url, &["operator", "passwd", "--passphrase-file", change.to_str().unwrap()]);
    assert!(changed.status.success(), "{changed:?}");
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, url, log) = spawn_khlangd_logged(&args, "info");
    let url = url.unwrap();
    let status = stdout(&khlang_anon(&url, &["operator", "status"]));
    assert!(status.starts_with("SEALED"), "{status}");
    let unseal_file = write_passphrase(tmp.path(), new_pass);
    let unsealed = stdout(&khlang_anon(&url, &["operator", "unseal", "--passphrase-file", &unseal_file]));
    assert!(unsealed.starts_with("unsealed"), "{unsealed}");
    let token = dev_token(&data, "registration-app");
    let put = khlang(&url, &token, &["put", "--subject", "dev-sealed", "postal_code=80000"]);
    assert!(put.status.success(), "the credentials file's tokens still work: {put:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    let all = log.recv_timeout(std::time::Duration::from_secs(10)).unwrap().unwrap_err();
    assert!(all.contains("the development passphrase was changed"), "{all}");
}

/// `khlang bench` spreads its requests over several connections, and its `list` baseline (an
/// authenticated, audited read of an empty subject) runs without errors beside put and get.
#[test]
fn bench_runs_over_several_connections_with_its_baseline() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let (mut child, url) =
        spawn_khlangd(&["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()]);
    let url = url.unwrap();
    let token = dev_token(&data, "registration-app");
    for op in ["list", "put", "get"] {
        let out = khlang(
            &url,
            &token,
            &[
                "bench",
                op,
                "--duration",
                "0.3",
                "--warmup",
                "0",
                "--concurrency",
                "6",
                "--connections",
                "3",
                "--records",
                "10",
                "--json",
            ],
        );
        let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        assert!(report["ok"].as_u64().unwrap() > 0 && report["errors"].as_u64() == Some(0), "{op}: {report}");
    }
    let audited = khlang(&url, &dev_token(&data, "security-officer"), &["audit", "query", "--json"]);
    assert!(stdout(&audited).contains("\"rpc\":\"ListRecords\""), "the baseline is audited like any read");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Scripts can tell failures apart by `khlang`'s exit status (the table in `khlang --help` and the
/// README), a usage error is 64 with a message that says what is expected, and a closed pipe
/// ends `khlang` and `khlangd init` quietly instead of panicking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_statuses_tell_failures_apart_and_a_closed_pipe_is_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (url, tokens) = (server.url(), server.tokens.clone());
    let id = server.client().await.put("exit-subject", canary_fields()).await.unwrap();
    let long = "an-identity-name-longer-than-any-column-was";
    let long_token = server.vault().bootstrap_identity(long, "registration-app").await.unwrap();
    let long_token = long_token.expose_secret().to_owned();
    tokio::task::spawn_blocking(move || {
        let status = |token: &str, args: &[&str]| {
            let o = khlang(&url, token, args);
            assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"), "{args:?}");
            (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
        };
        let tester = &tokens["tester"];
        let unknown = "00000000-0000-4000-8000-000000000000";
        assert_eq!(
            status(tester, &["get", unknown, "--purpose", "service_delivery"]).0,
            Some(11),
            "NotFound"
        );
        assert_eq!(status(tester, &["get", &id]).0, Some(10), "InvalidArgument: no purpose");
        assert_eq!(status(&tokens["registration-app"], &["audit", "query"]).0, Some(13), "PermissionDenied");
        assert_eq!(status("khl_not_a_token", &["list", "--subject", "x"]).0, Some(14), "Unauthenticated");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let closed = format!("http://127.0.0.1:{port}");
        let o = khlang(&closed, tester, &["list", "--subject", "x"]);
        assert_eq!(o.status.code(), Some(17), "Unavailable: {}", String::from_utf8_lossy(&o.stderr));
        let (code, err) = status(tester, &["audit", "query", "--decision", "maybe"]);
        assert_eq!(code, Some(64), "{err}");
        assert!(err.contains("allow") && err.contains("deny"), "says what is expected: {err}");
        let (code, err) = status(tester, &["audit", "query", "--since", "soon"]);
        assert_eq!(code, Some(64), "{err}");
        let help = stdout(&khlang(&url, tester, &["--help"]));
        assert!(help.contains("17  Unavailable"), "{help}");

        // Tables: RFC 3339 times (UTC with --utc), a header, nothing cut.
        let sec = &tokens["security-officer"];
        let table = stdout(&khlang(&url, sec, &["audit", "query", "--since", "1h", "--utc"]));
        let mut lines = table.lines();
        assert!(lines.next().unwrap().starts_with("seq  "), "{table}");
        let first = lines.next().expect("an entry within the last hour");
        assert!(first.split_whitespace().nth(1).unwrap().ends_with("+00:00"), "{first}");
        // An operation the CLI lists is one the server records.
        let reads = stdout(&khlang(&url, sec, &["audit", "query", "--operation", "read", "--json"]));
        assert!(reads.lines().any(|l| l.contains("\"rpc\":\"GetRecord\"")), "{reads}");
        stdout(&khlang(&url, &long_token, &["list", "--subject", "x"]));
        let table = stdout(&khlang(&url, sec, &["audit", "query", "--identity", long]));
        assert!(table.lines().nth(1).is_some_and(|l| l.contains(long)), "not cut: {table}");

        // A closed pipe: no panic, the status a program killed by SIGPIPE has.
        let mut child = Command::new(bin("khlang"))
            .args(["audit", "query"])
            .env("KHLANG_ADDR", &url)
            .env("KHLANG_TOKEN", sec)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains("panicked"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(o.status.code(), Some(141));

        // Completions for each shell.
        for shell in ["bash", "zsh", "fish"] {
            let script = stdout(&khlang(&url, "", &["completions", shell]));
            assert!(script.contains("khlang") && script.contains("audit"), "{shell}: {script}");
        }
    })
    .await
    .unwrap();
    server.stop().await;

    // `khlangd init … | head -1`: the reader goes away, khlangd does not panic.
    let tmp = tempfile::tempdir().unwrap();
    let pass = write_passphrase(tmp.path(), "municipal custodians' long passphrase");
    let data = tmp.path().join("vault");
    let mut init = Command::new(bin("khlangd"))
        .args(["init", "--data-dir", data.to_str().unwrap(), "--passphrase-file", &pass])
        .args(["--argon2-memory-kib", "19456", "--argon2-passes", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(init.stdout.take());
    let o = init.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(o.status.code() == Some(141) || o.status.success(), "{:?}: {err}", o.status);
    // And an ordinary refusal is one tidy line, no backtrace.
    let again = Command::new(bin("khlangd"))
        .args(["init", "--data-dir", data.to_str().unwrap(), "--passphrase-file", &pass])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(!err.contains("Caused by") && !err.contains("backtrace"), "{err}");
}

/// `--log-format json`: every line of the server's log is one JSON object; each request has its
/// line (rpc, identity, role, decision, status, latency, request id); unseal has one; and even at
/// `trace`, with every library's lines, no value, subject id, record id or token appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_a_line_per_request_and_no_personal_data_even_at_trace() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("vault");
    let mut child = Command::new(bin("khlangd"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--log-format",
            "json",
        ])
        .env("KHLANG_LOG", "trace")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let lines = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(a) = v["address"].as_str()
            {
                let _ = addr_tx.send(a.to_owned());
            }
            all.push(line);
        }
        all
    });
    let addr = format!("http://{}", addr_rx.recv_timeout(Duration::from_secs(30)).expect("khlangd listens"));
    let token = dev_token(&data, "registration-app");
    let mut app = khlang_client::Client::connect(&addr, &token).await.unwrap();
    let subject = "json-log-subject-8841";
    let id = app.put(subject, canary_fields()).await.unwrap();
    app.get(&id, &[], Some("contact")).await.unwrap();
    let clerk = dev_token(&data, "billing-clerk");
    let mut clerk = khlang_client::Client::connect(&addr, &clerk).await.unwrap();
    let denied = clerk.get(&id, &["home_address".into()], Some("billing")).await.unwrap_err();
    assert_eq!(denied.code(), Some(khlang_client::Code::PermissionDenied));
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let lines = lines.join().unwrap();
    assert!(lines.len() > 50, "trace writes plenty: {}", lines.len());
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object a line ({e}): {l}")))
        .collect();
    let requests: Vec<&serde_json::Value> =
        parsed.iter().filter(|v| v["target"] == "khlang::request").collect();
    let put = requests.iter().find(|v| v["rpc"] == "PutRecord").expect("a line for the put");
    assert_eq!(
        (put["identity"].as_str(), put["role"].as_str()),
        (Some("registration-app"), Some("registration-app"))
    );
    assert_eq!((put["decision"].as_str(), put["status"].as_str()), (Some("allow"), Some("Ok")));
    assert!(
        put["latency_us"].as_u64().is_some() && put["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "{put}"
    );
    let deny = requests
        .iter()
        .find(|v| v["rpc"] == "GetRecord" && v["decision"] == "deny")
        .expect("the denied read");
    assert_eq!(deny["status"], "PermissionDenied");
    assert!(parsed.iter().any(|v| v["message"] == "vault unsealed"), "an unseal line");
    let secrets =
        [CANARY_CARD, CANARY_NAME_TH, CANARY_ADDRESS_TH, CANARY_EMAIL, subject, id.as_str(), token.as_str()];
    for line in &lines {
        for s in secrets {
            assert!(!line.contains(s), "the log holds '{s}': {line}");
        }
    }
}

/// SIGTERM with requests in flight: the requests in flight finish (each acknowledged or refused
/// whole), the daemon signs a final checkpoint over its last entry, removes its PID file and exits
/// promptly; restarted, every acknowledged write is there and the log verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_signs_and_exits_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("vault");
    let pid_file = dir.path().join("khlangd.pid");
    let args = [
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
    ];
    let (mut daemon, addr) = spawn_khlangd(&args);
    let addr = addr.expect("khlangd dev starts");
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_owned();
    assert_eq!(pid, daemon.id().to_string(), "the PID file names the daemon");
    let token = dev_token(&data, "registration-app");
    let acknowledged: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let refused: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let mut writers = Vec::new();
    for w in 0..8 {
        let (acknowledged, refused, addr, token) =
            (acknowledged.clone(), refused.clone(), addr.clone(), token.clone());
        writers.push(tokio::spawn(async move {
            let mut c = khlang_client::Client::connect(&addr, &token).await.unwrap();
            for i in 0.. {
                match c.put(&format!("term-subject-{w}-{i}"), [("email", CANARY_EMAIL)]).await {
                    Ok(id) => acknowledged.lock().unwrap().push(id),
                    Err(e) => {
                        refused.lock().unwrap().push(format!("{:?}: {e}", e.code()));
                        break;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let signalled = std::time::Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || {
        let status = daemon.wait().unwrap();
        (status, daemon)
    })
    .await
    .unwrap();
    let took = signalled.elapsed();
    assert!(status.0.success(), "{:?}", status.0);
    assert!(took < Duration::from_secs(3), "exited {took:?} after SIGTERM");
    for w in writers {
        w.await.unwrap();
    }
    let ids = acknowledged.lock().unwrap().clone();
    assert!(ids.len() > 20, "the burst was under way ({})", ids.len());
    let refused = refused.lock().unwrap().clone();
    // Once the server stops accepting, a request ends unprocessed: refused at connect, cancelled
    // before hyper sent it, or above the server's GOAWAY (which tonic calls Internal and the
    // client library reports as Unavailable, "safe to retry"); nothing else may end a request.
    assert!(
        refused.iter().all(|c| c.starts_with("Some(Unavailable)") || c.starts_with("Some(Cancelled)")),
        "refused otherwise: {refused:?}"
    );
    assert!(!pid_file.exists(), "the PID file is removed");
    // The final checkpoint covers the last entry.
    let audit = data.join("audit");
    let mut last_entry = 0u64;
    for (_, path) in khlang_server::audit::files::segments(&audit).unwrap() {
        let text = String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
        for l in text.lines() {
            if let Some(seq) =
                l.strip_prefix("e ").and_then(|r| r.split(' ').next()).and_then(|s| s.parse().ok())
            {
                last_entry = last_entry.max(seq);
            }
        }
    }
    let checkpoints = std::fs::read_to_string(audit.join("checkpoints.log")).unwrap();
    let last_signed: u64 =
        checkpoints.lines().last().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap();
    assert_eq!(last_signed, last_entry, "the final checkpoint signs the last entry");
    println!(
        "SIGTERM → exit in {took:?}; {} writes acknowledged, {} refused: {refused:?}",
        ids.len(),
        refused.len()
    );

    let (_daemon, addr) = spawn_khlangd(&args);
    let addr = addr.expect("restarts");
    let mut c = khlang_client::Client::connect(&addr, &token).await.unwrap();
    for id in &ids {
        c.get(id, &[], Some("contact")).await.unwrap_or_else(|e| panic!("acknowledged {id} lost: {e}"));
    }
    let mut sec = khlang_client::Client::connect(&addr, &dev_token(&data, "security-officer")).await.unwrap();
    assert!(matches!(sec.verify_audit(&[]).await.unwrap().verdict, khlang_client::Verdict::Intact));
}

/// The example systemd unit (`server/khlangd/systemd/khlangd.service`) passes
/// `systemd-analyze verify` without a warning, and every flag its ExecStart gives is one
/// `khlangd serve` knows.
#[test]
fn the_example_systemd_unit_verifies_and_names_real_flags() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/khlangd/systemd/khlangd.service"),
    )
    .unwrap();
    let exec: String = {
        let start = unit.find("ExecStart=").unwrap();
        let mut line = String::new();
        for l in unit[start..].lines() {
            line.push_str(l.trim_end_matches('\\'));
            if !l.ends_with('\\') {
                break;
            }
        }
        line
    };
    let help = Command::new(bin("khlangd")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(help.contains(flag), "khlangd serve has no {flag}");
    }
    // The configuration file it names, as shipped, checks (its /etc/khlang files made here).
    let etc = tempfile::tempdir().unwrap();
    let certs = Command::new(bin("khlangd")).args(["tls", "dev-certs"]).arg(etc.path()).output().unwrap();
    assert!(certs.status.success());
    std::fs::write(etc.path().join("regulations.toml"), test_regulations()).unwrap();
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/khlangd/khlangd.example.toml"),
    )
    .unwrap();
    let config = etc.path().join("khlangd.toml");
    std::fs::write(&config, example.replace("/etc/khlang", etc.path().to_str().unwrap())).unwrap();
    let check = Command::new(bin("khlangd")).args(["config", "check"]).arg(&config).output().unwrap();
    let text = stdout(&check);
    assert!(text.contains("# OK: regulations") && text.contains("TLS on"), "{text}");
    let Ok(analyze) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("\n*** SKIPPED the systemd-analyze check: systemd-analyze is not installed ***\n");
        return;
    };
    assert!(analyze.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("khlangd.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/khlangd", bin("khlangd").to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify: {err}");
}

/// `khlangd tls dev-certs` gives a person TLS and mutual TLS in two commands, and the client's
/// errors say what to do when the TLS setup is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_certs_set_up_mutual_tls_and_tls_mistakes_say_what_to_do() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let c = certs.to_str().unwrap();
    let made = Command::new(bin("khlangd"))
        .args(["tls", "dev-certs", c, "--client", "registration-app", "--client", "billing-clerk"])
        .output()
        .unwrap();
    let said = stdout(&made);
    assert!(said.contains("--tls-cert") && said.contains("--client-cert"), "says how to use them: {said}");
    for (name, mode) in [
        ("ca.pem", 0o644),
        ("server.key", 0o600),
        ("client-billing-clerk.key", 0o600),
        ("client-registration-app.pem", 0o644),
    ] {
        assert_eq!(std::fs::metadata(certs.join(name)).unwrap().permissions().mode() & 0o777, mode, "{name}");
    }
    let again = Command::new(bin("khlangd")).args(["tls", "dev-certs", c]).output().unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not overwritten"));

    let data = tmp.path().join("vault");
    let (_daemon, addr) = spawn_khlangd(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--tls-cert",
        &format!("{c}/server.pem"),
        "--tls-key",
        &format!("{c}/server.key"),
        "--client-ca",
        &format!("{c}/ca.pem"),
        "--client-cert-optional",
    ]);
    let port = addr.expect("khlangd serves TLS").rsplit(':').next().unwrap().to_owned();
    let https = format!("https://localhost:{port}");
    let run = |addr: &str, token: Option<&str>, tls: &[String], args: &[&str]| {
        let mut cmd = Command::new(bin("khlang"));
        cmd.env_remove("KHLANG_TOKEN").arg("--addr").arg(addr).args(tls).args(args);
        if let Some(t) = token {
            cmd.env("KHLANG_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let ca = vec!["--ca-cert".to_owned(), format!("{c}/ca.pem")];
    let mut cert = ca.clone();
    cert.extend(["--client-cert".to_owned(), format!("{c}/client-registration-app.pem")]);
    cert.extend(["--client-key".to_owned(), format!("{c}/client-registration-app.key")]);
    // The certificate alone authenticates: its common name is the identity.
    let id =
        stdout(&run(&https, None, &cert, &["put", "--subject", "tls-subject", "age=41"])).trim().to_owned();
    assert_eq!(id.len(), 36, "{id}");
    // A token over TLS works too.
    let app = dev_token(&data, "registration-app");
    let listed = stdout(&run(&https, Some(&app), &ca, &["list", "--subject", "tls-subject"]));
    assert!(listed.contains(&id), "{listed}");
    let clerk = dev_token(&data, "billing-clerk");

    let err = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let o = run(&https, Some(&clerk), &[], &["list", "--subject", "x"]);
    assert!(!o.status.success() && err(&o).contains("pass --ca-cert"), "{}", err(&o));
    let o = run(&format!("http://127.0.0.1:{port}"), Some(&clerk), &[], &["list", "--subject", "x"]);
    assert!(!o.status.success() && err(&o).contains("https://"), "{}", err(&o));
    let o = run(&https, Some(&clerk), &cert, &["list", "--subject", "x"]);
    assert_eq!(o.status.code(), Some(14), "{}", err(&o));
    assert!(err(&o).contains("different identities"), "{}", err(&o));

    // A server that requires client certificates: a client without one is told so.
    let strict = tmp.path().join("strict");
    let (mut strict_daemon, addr, log) = spawn_khlangd_logged(
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            strict.to_str().unwrap(),
            "--tls-cert",
            &format!("{c}/server.pem"),
            "--tls-key",
            &format!("{c}/server.key"),
            "--client-ca",
            &format!("{c}/ca.pem"),
        ],
        "info",
    );
    let port = addr.expect("a strict TLS server").rsplit(':').next().unwrap().to_owned();
    let strict_url = format!("https://localhost:{port}");
    let o = run(&strict_url, Some(&dev_token(&strict, "registration-app")), &ca, &["list", "--subject", "x"]);
    assert!(!o.status.success() && err(&o).contains("--client-cert"), "{}", err(&o));
    stdout(&run(&strict_url, None, &cert, &["list", "--subject", "x"]));
    // Failed handshakes are logged with the peer's address; a client failing on purpose, again
    // and again, gets at most 20 lines in ten seconds.
    for _ in 0..40 {
        use std::io::Write;
        let mut plain = std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).unwrap();
        let _ = plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let _ = plain.shutdown(std::net::Shutdown::Both);
    }
    std::thread::sleep(Duration::from_millis(500));
    strict_daemon.kill().unwrap();
    strict_daemon.wait().unwrap();
    let log = log.recv_timeout(Duration::from_secs(10)).unwrap().unwrap_err();
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("TLS handshake failed")).collect();
    assert!(!failed.is_empty(), "{log}");
    assert!(failed.iter().all(|l| l.contains("peer=127.0.0.1:")), "{failed:?}");
    assert!(failed.iter().any(|l| l.contains("no certificate") || l.contains("NoCertificate")), "{failed:?}");
    assert!(failed.len() <= 20, "{} lines", failed.len());
}

/// A scraped sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// `--metrics-listen`: Prometheus text on its own listener, scraped over HTTP and parsed: request
/// counts by RPC and status, latency histograms, decisions by role, purpose and decision, audit
/// sync latency, chain state, sealed, lockouts; no label carries a subject, record id, value,
/// identity or a purpose the regulations do not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_parsed_and_carry_no_personal_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("vault");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{port}");
    let (_daemon, addr) = spawn_khlangd(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--metrics-listen",
        &metrics,
    ]);
    let addr = addr.expect("khlangd dev starts");
    let mut app = khlang_client::Client::connect(&addr, &dev_token(&data, "registration-app")).await.unwrap();
    let subject = "metrics-subject-5512";
    let id = app.put(subject, canary_fields()).await.unwrap();
    app.get(&id, &[], Some("contact")).await.unwrap();
    let smuggled = "somchai-in-a-purpose";
    assert!(app.get(&id, &[], Some(smuggled)).await.is_err());
    let mut clerk = khlang_client::Client::connect(&addr, &dev_token(&data, "billing-clerk")).await.unwrap();
    assert!(clerk.get(&id, &["home_address".into()], Some("billing")).await.is_err());
    tokio::time::sleep(Duration::from_millis(1300)).await; // the gauges' next round
    let scrape = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    let (head, body) = scrape.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Parse every sample line: name{labels} value.
    let mut samples: Vec<Sample> = Vec::new();
    for line in body.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let labels = rest.trim_end_matches('}').split("\",").filter(|p| !p.is_empty()).map(|p| {
                    let (k, v) = p.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line}"));
                    (k.to_owned(), v.trim_end_matches('"').to_owned())
                });
                (n.to_owned(), labels.collect())
            }
            None => (series.to_owned(), Vec::new()),
        };
        samples.push((name, labels, value));
    }
    let find = |name: &str, want: &[(&str, &str)]| {
        samples.iter().find(|(n, labels, _)| {
            n == name && want.iter().all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
    };
    assert!(
        find("khlang_requests_total", &[("rpc", "PutRecord"), ("status", "Ok")]).is_some_and(|s| s.2 >= 1.0)
    );
    assert!(find("khlang_requests_total", &[("rpc", "GetRecord"), ("status", "PermissionDenied")]).is_some());
    assert!(
        find("khlang_request_duration_seconds_bucket", &[("rpc", "GetRecord"), ("le", "+Inf")]).is_some()
    );
    assert!(
        find(
            "khlang_decisions_total",
            &[("role", "billing-clerk"), ("purpose", "billing"), ("decision", "deny")]
        )
        .is_some()
    );
    assert!(
        find(
            "khlang_decisions_total",
            &[("role", "registration-app"), ("purpose", "contact"), ("decision", "allow")]
        )
        .is_some()
    );
    assert!(find("khlang_audit_sync_seconds_count", &[]).is_some_and(|s| s.2 >= 1.0));
    assert_eq!(find("khlang_sealed", &[]).map(|s| s.2), Some(0.0));
    assert_eq!(find("khlang_audit_chain_state", &[("state", "broken")]).map(|s| s.2), Some(0.0));
    assert!(find("khlang_audit_checkpoint_age_seconds", &[]).is_some());
    assert!(find("khlang_locked_out_credentials", &[]).is_some());
    for (name, labels, _) in &samples {
        for (k, v) in labels {
            for secret in [CANARY_CARD, CANARY_EMAIL, CANARY_NAME_TH, subject, id.as_str(), smuggled] {
                assert!(!v.contains(secret), "{name}{{{k}={v}}} carries '{secret}'");
            }
            assert_ne!(k, "identity", "{name}: identities are not labels");
        }
    }
    // The read with a purpose the regulations do not know was refused before any decision: counted
    // by status, its purpose nowhere.
    assert!(find("khlang_requests_total", &[("rpc", "GetRecord"), ("status", "InvalidArgument")]).is_some());
}

/// One file configures every command; the environment beats the file and a flag beats both;
/// what the file must not say (an unknown name, a one-time decision) stops the daemon, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_file_sets_what_the_environment_and_flags_do_not() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    let pass = write_passphrase(tmp.path(), "configured custodian passphrase");
    let regs = tmp.path().join("regulations.toml");
    std::fs::write(&regs, test_regulations()).unwrap();
    let pid_file = tmp.path().join("khlangd.pid");
    // The file's address is taken: only the environment's (which beats it) can be served.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = tmp.path().join("khlangd.toml");
    std::fs::write(
        &config,
        format!(
            "# khlangd's settings\n\
             data-dir = {data:?}\npassphrase-file = [{pass:?}]\nregulations = {regs:?}\n\
             listen = \"{}\"\nlog-format = \"json\"\npid-file = {pid_file:?}\n\
             argon2-memory-kib = 19456\nargon2-passes = 2\n\
             initial-identity = [\"tester\"]\ninitial-role = \"tester\"\nauth-max-failures = 4\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let config_s = config.to_str().unwrap();

    let init = Command::new(bin("khlangd")).args(["--config", config_s, "init"]).output().unwrap();
    let token = stdout(&init).lines().last().unwrap().trim().to_owned();
    assert!(token.starts_with("khl_"), "init took its folder, passphrase and identity from the file");
    assert!(data.join("db").is_dir() && data.join("audit").is_dir(), "the vault is in the file's data-dir");

    // `config check`: the effective settings with their sources, no password.
    let check = Command::new(bin("khlangd"))
        .args(["config", "check", config_s])
        .env("KHLANG_LISTEN", "127.0.0.1:0")
        .env("KHLANG_STORAGE", "postgres://khlang:pw-canary-9@db.example/khlang")
        .output()
        .unwrap();
    let text = stdout(&check);
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} = ")))
            .unwrap_or_else(|| panic!("{name}: {text}"))
    };
    assert!(
        line("listen").contains("\"127.0.0.1:0\"") && line("listen").ends_with("# environment KHLANG_LISTEN")
    );
    assert!(line("data-dir").ends_with("# file"), "{text}");
    assert!(line("auth-max-failures").contains("= 4") && line("auth-max-failures").ends_with("# file"));
    assert!(line("auth-lockout-secs").ends_with("# default"), "{text}");
    assert!(line("storage").contains("postgres://khlang@db.example/khlang"), "{text}");
    assert!(!text.contains("pw-canary-9") && !text.contains("configured custodian"), "{text}");
    assert!(text.contains("# OK: regulations"), "{text}");

    // Served from the file, the environment's address and the flag's log format winning.
    let (mut child, url, _log) = spawn_khlangd_with(
        &["--config", config_s, "serve", "--log-format", "text"],
        "info",
        &[("KHLANG_LISTEN", "127.0.0.1:0")],
    );
    let url = url.unwrap_or_else(|log| panic!("not served: {log}"));
    let id = stdout(&khlang(&url, &token, &["put", "--subject", "configured", "email=cfg@example.org"]));
    let got = stdout(&khlang(&url, &token, &["get", id.trim(), "--json", "--purpose", "service_delivery"]));
    assert!(got.contains("cfg@example.org"), "{got}");
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert_eq!(pid, child.id(), "the PID file the configuration names");
    child.kill().unwrap();
    child.wait().unwrap();

    // A flag beats the file: the file's taken address, named on the command line, cannot be served.
    let (mut child, result) = spawn_khlangd(&["--config", config_s, "serve", "--log-format", "text"]);
    assert!(!child.wait().unwrap().success());
    assert!(result.unwrap_err().contains("cannot listen on"));

    // Refusals name the file and the setting, found through KHLANG_CONFIG too.
    for (bad, says) in [
        ("lisen = \"127.0.0.1:0\"\n", "unknown setting 'lisen'"),
        ("data_dir = \"/tmp\"\n", "'data-dir'"),
        ("regulations-changed = true\n", "a decision for one start"),
        ("allow-plaintext = \"yes\"\n", "is a switch"),
        ("[serve]\nlisten = \"127.0.0.1:0\"\n", "no sections"),
        ("listen = \"127.0.0.1:0\n", "not valid TOML"),
    ] {
        let file = tmp.path().join("bad.toml");
        std::fs::write(&file, bad).unwrap();
        let out = Command::new(bin("khlangd"))
            .args(["serve", "--data-dir", data.to_str().unwrap()])
            .env("KHLANG_CONFIG", &file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad}: {err}");
        assert!(err.contains(says) && err.contains("bad.toml"), "{bad}: {err}");
        if !says.contains("TOML") {
            // (a TOML error shows the line and a caret under the mistake)
            assert_eq!(err.lines().count(), 1, "one tidy line: {err}");
        }
    }
    // `config check` refuses what serving would refuse.
    let file = tmp.path().join("weak.toml");
    std::fs::write(&file, format!("data-dir = {data:?}\nauth-max-failures = 50\n")).unwrap();
    let out =
        Command::new(bin("khlangd")).args(["config", "check", file.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of bounds"));
    drop(taken);
}

/// The README's "Try it" runs as written in a non-interactive shell (against a development vault,
/// with the built `khlang` for `cargo run --release`), and each step does what its comment says.
#[test]
fn the_readme_try_it_runs_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let section = readme.split("## Try it").nth(1).unwrap();
    let script = section.split("```sh\n").nth(1).unwrap().split("```").next().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("khlang-dev");
    let (_daemon, url) =
        spawn_khlangd(&["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()]);
    let url = url.unwrap();
    let ran = "cargo run -q --release --bin khlang --";
    assert!(script.contains(ran) && script.contains("export KHLANG_ADDR=http://127.0.0.1:7420"));
    let script = script
        .replace(ran, bin("khlang").to_str().unwrap())
        .replace("export KHLANG_ADDR=http://127.0.0.1:7420", &format!("export KHLANG_ADDR={url}"));
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -x\n{script}"))
        .current_dir(tmp.path())
        .env_remove("KHLANG_TOKEN")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for expected in [
        "411111******1111",              // masked for contact
        "a read must state its purpose", // no purpose
        "PCI DSS 3.3.1",                 // cvv refused
        "4111111111111111",              // the clerk reads it in full for billing
        "PermissionDenied",              // ... not for contact
        "สมชาย ใจดี",                     // the DPO's export
        "intact",                        // audit verify
        "billing-clerk",                 // the audit query by identity
    ] {
        assert!(text.contains(expected), "the README's Try it did not show {expected:?}:\n{text}");
    }
    assert!(!text.contains("command not found") && !text.contains("panicked"), "{text}");
    assert!(!text.contains("NotFound"), "every id the script uses is one it was given: {text}");
    assert!(tmp.path().join("audit.jsonl").exists(), "khlang audit export wrote its file: {text}");
}

/// A valid card number (Luhn) unique to `n`.
/// A syslog receiver over TLS (RFC 5425) on 127.0.0.1 with `certs`' server certificate: every
/// octet-counted message of every connection, as (connection number, message).
/// With `client_certs`, it requires a client certificate that folder's CA signed.
fn tls_syslog_receiver(
    certs: &Path,
    client_certs: bool,
) -> (u16, std::sync::mpsc::Receiver<(usize, String)>) {
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(certs.join("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(certs.join("server.key")).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if client_certs {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(certs.join("ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
                .build()
                .unwrap(),
        )
    } else {
        builder.with_no_client_auth()
    };
    let config = std::sync::Arc::new(builder.with_single_cert(chain, key).unwrap());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, tcp) in listener.incoming().enumerate() {
            let (config, tx) = (config.clone(), tx.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = std::io::BufReader::new(rustls::StreamOwned::new(conn, tcp.unwrap()));
                loop {
                    let mut len = Vec::new();
                    if tls.read_until(b' ', &mut len).unwrap_or(0) == 0 {
                        return;
                    }
                    let Ok(len) = std::str::from_utf8(&len[..len.len() - 1]).unwrap_or("x").parse::<usize>()
                    else {
                        return;
                    };
                    let mut msg = vec![0u8; len];
                    if tls.read_exact(&mut msg).is_err()
                        || tx.send((n, String::from_utf8(msg).unwrap())).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, rx)
}

/// Audit entries reach a syslog receiver over TLS, octet-counted RFC 5424 with the entry's JSON;
/// only a receiver whose certificate the named CA signed gets them (a vault pointed at one signed
/// by another CA logs why and keeps serving); a TLS sink without a CA, a CA for a sink that is
/// not TLS, and a CA file that is not there are refused at start in one line.
#[tokio::test]
async fn audit_entries_stream_to_a_syslog_receiver_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let (certs, foreign) = (tmp.path().join("certs"), tmp.path().join("foreign"));
    for dir in [&certs, &foreign] {
        assert!(
            khlangd_cmd(&["tls", "dev-certs", dir.to_str().unwrap(), "--client", "khlangd"]).status.success()
        );
    }
    let (port, received) = tls_syslog_receiver(&certs, false);
    let sink = format!("syslog+tls://localhost:{port}");
    let data = tmp.path().join("vault");
    let ca = certs.join("ca.pem");
    let dev = ["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()];
    for (extra, says) in [
        (vec!["--audit-sink", &sink], "--audit-sink-ca"),
        (
            vec!["--audit-sink", "syslog://localhost:514", "--audit-sink-ca", ca.to_str().unwrap()],
            "only for a syslog+tls",
        ),
        (vec!["--audit-sink", &sink, "--audit-sink-ca", "/nonexistent/ca.pem"], "/nonexistent/ca.pem"),
        (vec!["--audit-sink-ca", ca.to_str().unwrap()], "without --audit-sink"),
    ] {
        let out = khlangd_cmd(&[&dev[..], &extra[..]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says) && err.trim().lines().count() == 1,
            "{extra:?}: {err}"
        );
    }

    let (mut daemon, url) = spawn_khlangd(
        &[&dev[..], &["--audit-sink", &sink, "--audit-sink-ca", ca.to_str().unwrap()]].concat(),
    );
    let mut c = khlang_client::Client::connect(&url.expect("starts"), &dev_token(&data, "registration-app"))
        .await
        .unwrap();
    let id = c.put("tls-syslog-subject", [("card_number", CANARY_CARD)]).await.unwrap();
    c.get(&id, &[], Some("contact")).await.unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < 2 {
        let (_, msg) = received.recv_timeout(Duration::from_secs(10)).expect("an entry within 10 s");
        let (header, json) = msg.split_once(" - \u{feff}").expect("RFC 5424 with a UTF-8 BOM");
        let fields: Vec<&str> = header.split(' ').collect();
        assert_eq!((fields[0], fields[3], fields[5]), ("<110>1", "khlangd", "audit"), "{header}");
        assert!(!msg.contains(CANARY_CARD) && !msg.contains("tls-syslog-subject"), "{msg}");
        let entry: serde_json::Value = serde_json::from_str(json).unwrap();
        if entry["record_id"] == id.as_str() {
            seqs.push((entry["seq"].as_u64().unwrap(), entry["rpc"].as_str().unwrap().to_owned()));
        }
    }
    assert_eq!(seqs.iter().map(|(_, r)| r.as_str()).collect::<Vec<_>>(), ["PutRecord", "GetRecord"]);
    assert_eq!(seqs[1].0, seqs[0].0 + 1, "{seqs:?}");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    while received.recv_timeout(Duration::from_millis(300)).is_ok() {}

    // A receiver whose certificate the named CA did not sign gets nothing; the vault serves on.
    let other = tmp.path().join("other");
    let (mut daemon, url, log) = spawn_khlangd_logged(
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            other.to_str().unwrap(),
            "--audit-sink",
            &sink,
            "--audit-sink-ca",
            foreign.join("ca.pem").to_str().unwrap(),
        ],
        "info",
    );
    let mut c = khlang_client::Client::connect(&url.expect("starts"), &dev_token(&other, "registration-app"))
        .await
        .unwrap();
    let id = c.put("tls-syslog-subject", [("card_number", CANARY_CARD)]).await.unwrap();
    c.get(&id, &[], Some("contact")).await.unwrap();
    assert!(received.recv_timeout(Duration::from_secs(2)).is_err(), "an unverified receiver got an entry");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let log = log.recv_timeout(Duration::from_secs(10)).unwrap().unwrap_err();
    let failed: Vec<&str> =
        log.lines().filter(|l| l.contains("the audit sink failed to take an entry")).collect();
    assert!(!failed.is_empty() && failed[0].contains("certificate"), "{log}");

    // A receiver that requires a client certificate: the vault's (--audit-sink-cert/-key, signed
    // by the receiver's CA) is accepted; without one the receiver refuses and the log says so.
    let (port, received) = tls_syslog_receiver(&certs, true);
    let sink = format!("syslog+tls://localhost:{port}");
    let (cert, key) = (certs.join("client-khlangd.pem"), certs.join("client-khlangd.key"));
    let with_cert = [
        "--audit-sink",
        &sink,
        "--audit-sink-ca",
        ca.to_str().unwrap(),
        "--audit-sink-cert",
        cert.to_str().unwrap(),
        "--audit-sink-key",
        key.to_str().unwrap(),
    ];
    let out = khlangd_cmd(&[&dev[..], &with_cert[..6]].concat());
    assert!(!out.status.success(), "a certificate without its key is refused");
    for (n, flags) in [with_cert.to_vec(), with_cert[..4].to_vec()].into_iter().enumerate() {
        let data = tmp.path().join(format!("mutual-{n}"));
        let args =
            [&["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()][..], &flags[..]]
                .concat();
        let (mut daemon, url, log) = spawn_khlangd_logged(&args, "info");
        let mut c =
            khlang_client::Client::connect(&url.expect("starts"), &dev_token(&data, "registration-app"))
                .await
                .unwrap();
        let id = c.put("tls-syslog-subject", [("card_number", CANARY_CARD)]).await.unwrap();
        c.get(&id, &[], Some("contact")).await.unwrap();
        let mut delivered = false;
        while let Ok((_, msg)) = received.recv_timeout(Duration::from_secs(if n == 0 { 10 } else { 2 })) {
            if msg.contains(&id) && msg.contains("GetRecord") {
                delivered = true;
                break;
            }
        }
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        let log = log.recv_timeout(Duration::from_secs(10)).unwrap().unwrap_err();
        if n == 0 {
            assert!(delivered, "the vault's client certificate was accepted: {log}");
        } else {
            assert!(!delivered, "a receiver requiring a client certificate got an entry without one");
            assert!(log.contains("CertificateRequired"), "the log says why: {log}");
        }
    }
}

/// `khlangd --audit-sink syslog://…`: every entry arrives as one RFC 5424 message over UDP
/// (facility log audit, APP-NAME khlangd, MSGID audit, the entry's canonical JSON), with no
/// value; a sink that is not a file:// or syslog:// URL is refused with one tidy line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_entries_stream_to_syslog_as_rfc5424() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let sink = format!("syslog://{}", receiver.local_addr().unwrap());
    let bad = khlangd_cmd(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--audit-sink",
        "http://siem",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("--audit-sink") && err.lines().count() == 1, "{err}");

    let (mut daemon, url) = spawn_khlangd(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--audit-sink",
        &sink,
    ]);
    let url = url.expect("khlangd dev starts");
    let mut c = khlang_client::Client::connect(&url, &dev_token(&data, "registration-app")).await.unwrap();
    let id = c.put("syslog-subject", [("card_number", CANARY_CARD)]).await.unwrap();
    c.get(&id, &[], Some("contact")).await.unwrap();
    let mut seqs = Vec::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = receiver.recv(&mut buf).expect("a syslog message within 5 s");
        let msg = String::from_utf8(buf[..n].to_vec()).unwrap();
        let (header, json) = msg.split_once(" - \u{feff}").expect("RFC 5424 with a UTF-8 BOM");
        let fields: Vec<&str> = header.split(' ').collect();
        assert_eq!((fields[0], fields[3], fields[5]), ("<110>1", "khlangd", "audit"), "{header}");
        assert!(fields[1].len() >= 20 && fields[1].ends_with('Z') && fields[1].contains('T'), "{header}");
        assert!(!msg.contains(CANARY_CARD) && !msg.contains("syslog-subject"), "{msg}");
        let entry: serde_json::Value = serde_json::from_str(json).unwrap();
        if entry["record_id"] == id.as_str() {
            seqs.push((entry["seq"].as_u64().unwrap(), entry["rpc"].as_str().unwrap().to_owned()));
        }
        if seqs.len() == 2 {
            break;
        }
    }
    let rpcs: Vec<&str> = seqs.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(rpcs, ["PutRecord", "GetRecord"], "{seqs:?}");
    assert_eq!(seqs[1].0, seqs[0].0 + 1, "{seqs:?}");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
