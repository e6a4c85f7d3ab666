//! The real binaries: `khlang` against a server, and `khlangd` init / serve / dev across restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::process::Command;
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
