//! Files other users of the machine could read or rewrite are refused by khlangd, naming the file
//! and the mode to set (issue 25): a passphrase file or TLS private key open to others, a
//! configuration holding a password readable by others, and settings (configuration, regulations,
//! a CA it trusts) writable by others. Each is sent as an attacker sharing the host would leave it.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use khlang_tests::*;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs khlangd, which must refuse to go on (within seconds: one that serves instead is killed
/// and fails the test), and returns what it printed on stderr.
fn refused(args: &[&str]) -> String {
    let mut child = Command::new(bin("khlangd"))
        .args(args)
        .env("KHLANG_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            child.kill().unwrap();
            panic!("{args:?} was not refused: khlangd went on");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{args:?} must be refused: {err}");
    err
}

#[test]
fn files_open_to_other_users_are_refused_naming_the_mode_to_set() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    let data_s = data.to_str().unwrap();
    let pass = write_passphrase(tmp.path(), "a custodian's passphrase for the mode test");

    // A passphrase readable by the group or the world: nothing is created.
    for mode in [0o644, 0o640, 0o604] {
        chmod(Path::new(&pass), mode);
        let err = refused(&["init", "--data-dir", data_s, "--passphrase-file", &pass]);
        assert!(err.contains(&pass) && err.contains(&format!("mode {mode:04o}")), "{err}");
        assert!(err.contains(&format!("chmod 600 {pass}")), "{err}");
        assert!(!err.contains("mode test"), "the passphrase never printed: {err}");
        assert!(!data.join("db").exists(), "nothing initialised");
    }
    chmod(Path::new(&pass), 0o600);
    let init = Command::new(bin("khlangd"))
        .args(["init", "--data-dir", data_s, "--passphrase-file", &pass, "--initial-identity", "tester"])
        .output()
        .unwrap();
    assert!(init.status.success(), "0600 is accepted: {}", String::from_utf8_lossy(&init.stderr));
    // At start too: `serve --passphrase-file N=FILE`.
    chmod(Path::new(&pass), 0o644);
    let err =
        refused(&["serve", "--data-dir", data_s, "--listen", "127.0.0.1:0", "--passphrase-file", &pass]);
    assert!(err.contains("chmod 600"), "{err}");
    chmod(Path::new(&pass), 0o600);

    // Regulations others can rewrite decide who reads what: refused.
    let regs = tmp.path().join("regulations.toml");
    std::fs::write(&regs, test_regulations()).unwrap();
    chmod(&regs, 0o666);
    let regs_s = regs.to_str().unwrap();
    let err = refused(&[
        "serve",
        "--data-dir",
        data_s,
        "--listen",
        "127.0.0.1:0",
        "--passphrase-file",
        &pass,
        "--regulations",
        regs_s,
    ]);
    assert!(err.contains(regs_s) && err.contains("mode 0666") && err.contains("chmod go-w"), "{err}");
    chmod(&regs, 0o644);

    // A configuration file: writable by others is refused; readable by others is refused only
    // when it holds a password, which is never printed.
    let config = tmp.path().join("khlangd.toml");
    std::fs::write(&config, format!("data-dir = {data:?}\nlisten = \"127.0.0.1:0\"\n")).unwrap();
    let config_s = config.to_str().unwrap();
    chmod(&config, 0o644);
    let ok = Command::new(bin("khlangd")).args(["config", "check", config_s]).output().unwrap();
    assert!(ok.status.success(), "a 0644 file without a password: {}", String::from_utf8_lossy(&ok.stderr));
    chmod(&config, 0o664);
    let err = refused(&["config", "check", config_s]);
    assert!(err.contains(config_s) && err.contains("mode 0664") && err.contains("chmod go-w"), "{err}");
    std::fs::write(
        &config,
        format!("data-dir = {data:?}\nstorage = \"postgres://khlang:pw-canary-7@db.example/khlang\"\n"),
    )
    .unwrap();
    chmod(&config, 0o644);
    for args in [vec!["config", "check", config_s], vec!["--config", config_s, "serve"]] {
        let err = refused(&args);
        assert!(err.contains("holds a password") && err.contains("chmod 600"), "{err}");
        assert!(!err.contains("pw-canary-7"), "{err}");
    }

    // The TLS private key open to others, and a client CA others can replace.
    let certs = tmp.path().join("certs");
    let made =
        Command::new(bin("khlangd")).args(["tls", "dev-certs", certs.to_str().unwrap()]).output().unwrap();
    assert!(made.status.success());
    let (cert, key, ca) = (certs.join("server.pem"), certs.join("server.key"), certs.join("ca.pem"));
    let tls = |extra: &[&str]| {
        let mut args = vec![
            "serve",
            "--data-dir",
            data_s,
            "--listen",
            "127.0.0.1:0",
            "--passphrase-file",
            &pass,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        refused(&args)
    };
    chmod(&key, 0o640);
    let err = tls(&[]);
    assert!(err.contains("TLS private key") && err.contains("mode 0640"), "{err}");
    chmod(&key, 0o600);
    chmod(&ca, 0o646);
    let err = tls(&["--client-ca", ca.to_str().unwrap()]);
    assert!(err.contains("client CA file") && err.contains("chmod go-w"), "{err}");
}
