//! The `khlangd` binary's own argument and passphrase handling (no network needed).
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::process::{Command, Stdio};

fn khlangd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_khlangd"));
    c.env_remove("KHLANG_PASSPHRASE").stdin(Stdio::null());
    c
}

#[test]
fn help_lists_init_serve_dev() {
    let out = khlangd().arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for sub in ["init", "serve", "dev"] {
        assert!(text.contains(sub), "{text}");
    }
    assert!(!text.contains("bench-plaintext-baseline"), "the benchmark-only flag stays hidden");
}

/// A plain build (no `bench` feature) has no switch that turns a protection off: each is an
/// unknown argument, refused before anything is opened.
#[cfg(not(feature = "bench"))]
#[test]
fn a_plain_build_has_no_benchmark_switches() {
    for flag in ["--bench-plaintext-baseline", "--bench-skip-policy", "--bench-skip-audit"] {
        let dir = tempfile::tempdir().unwrap();
        let out = khlangd()
            .args(["dev", "--listen", "127.0.0.1:0", "--data-dir", dir.path().to_str().unwrap(), flag])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} was accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("unexpected argument"), "{flag}");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing created for {flag}");
    }
}

#[test]
fn no_passphrase_without_a_terminal_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = khlangd().args(["init", "--data-dir", dir.path().to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no passphrase"));
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing created");
}

#[test]
fn serve_on_an_empty_folder_says_it_is_not_initialised() {
    let dir = tempfile::tempdir().unwrap();
    let out = khlangd()
        .args(["serve", "--data-dir", dir.path().to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .env("KHLANG_PASSPHRASE", "whatever passphrase")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not initialised"));
}

#[test]
fn lockout_flags_outside_their_bounds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for (flag, value, says) in [
        ("--auth-max-failures", "0", "out of bounds: 1 to 10"),
        ("--auth-max-failures", "11", "out of bounds: 1 to 10"),
        ("--auth-lockout-secs", "60", "too short: at least 1800"),
    ] {
        let out = khlangd()
            .args(["dev", "--data-dir", data, "--listen", "127.0.0.1:0", flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing created");
}

#[test]
fn init_refuses_short_or_shared_custodian_passphrases() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pass: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{pass}\n")).unwrap();
        // (khlangd refuses a passphrase file others could read)
        #[cfg(unix)]
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (short, long_a, long_b) = (
        write("s", "too short"),
        write("a", "custodian a: a long one"),
        write("b", "custodian a: a long one"),
    );
    let data = dir.path().join("vault");
    let data = data.to_str().unwrap();
    let init = |files: &[&str]| {
        let mut c = khlangd();
        c.args(["init", "--data-dir", data, "--argon2-memory-kib", "19456", "--argon2-passes", "2"]);
        if files.len() > 1 {
            c.args(["--custodians", &files.len().to_string(), "--threshold", "2"]);
        }
        for f in files {
            c.args(["--passphrase-file", f]);
        }
        c.output().unwrap()
    };
    let out = init(&[&short]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at least 12 characters"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = init(&[&long_a, &long_b]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the same passphrase"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `khlangd config check` and every error line never print a password: not a storage URL's, not
/// one in a keyword setting, not the audit sink's, not the one in a TOML line or an argument the
/// daemon could not take.
#[test]
fn config_check_and_errors_never_print_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("khlangd.toml");
    let run = |text: &str, env: &[(&str, &str)]| {
        std::fs::write(&config, text).unwrap();
        #[cfg(unix)]
        std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let mut c = khlangd();
        c.args(["config", "check", config.to_str().unwrap()]);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let data = dir.path().join("v");
    let base = format!("data-dir = \"{}\"\nlisten = \"127.0.0.1:0\"\n", data.display());
    for (what, text, env) in [
        (
            "a storage URL",
            format!("{base}storage = \"postgres://khlang:canary-pw-1@db.example/khlang\"\n"),
            vec![],
        ),
        (
            "a keyword setting",
            format!("{base}storage = \"host=db user=k password=canary-pw-2 dbname=x\"\n"),
            vec![],
        ),
        (
            "the audit sink",
            format!("{base}audit-sink = \"syslog+tls://u:canary-pw-3@siem.example:6514\"\n"),
            vec![],
        ),
        ("a broken TOML line", format!("{base}storage = \"postgres://u:canary-pw-4@db/x\n"), vec![]),
        ("an argument refused", base.clone(), vec![("KHLANG_LISTEN", "postgres://u:canary-pw-5@db/x")]),
    ] {
        let said = run(&text, &env);
        assert!(!said.contains("canary-pw"), "{what}: {said}");
    }
    // The same on the command line of `serve`.
    let out = khlangd()
        .args(["serve", "--data-dir", data.to_str().unwrap(), "--listen", "postgres://u:canary-pw-6@db/x"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !said.contains("canary-pw") && said.contains("***"), "{said}");
}
