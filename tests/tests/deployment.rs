//! Deploying the real binaries: the example systemd unit, development TLS certificates, metrics,
//! a configuration file, and the README's "Try it" as written.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use khlang_tests::*;

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
