//! Backups over the real binaries: `khlang operator backup` under load, `khlangd restore`,
//! `khlangd verify`, and what an attacker with a backup file can (not) do with it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::time::Duration;

use khlang_tests::*;

/// The bodies of a backup's frames (after its 10-byte magic, each behind a u32 length).
fn frames(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let (mut at, mut out) = (10, Vec::new());
    while at < bytes.len() {
        let n = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        out.push(at + 4..at + 4 + n);
        at += 4 + n;
    }
    out
}

/// Recomputes a backup's checksum (the SHA-256 of every byte before the End frame, which ends
/// with it and the 64-byte signature behind its length byte), as anyone who knows the format can;
/// the signature cannot be remade without the vault's audit key.
fn reseal(bytes: &mut [u8]) {
    let end = frames(bytes).pop().unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes[..end.start - 4]);
    let at = end.end - 65 - 32;
    bytes[at..at + 32].copy_from_slice(digest.as_ref());
}

/// `khlangd restore FILE --data-dir DIR --audit-public-key KEY`.
fn restore(file: &std::path::Path, dir: &std::path::Path, public_key: &str) -> std::process::Output {
    khlangd_cmd(&[
        "restore",
        file.to_str().unwrap(),
        "--data-dir",
        dir.to_str().unwrap(),
        "--audit-public-key",
        public_key,
    ])
}

/// `khlang operator backup` under load, `khlangd restore` into a new folder, `khlangd verify`,
/// and every record acknowledged before the backup began reads back, value for value, from the
/// restored vault; the mistakes an operator or an attacker could make with a backup are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_load_restores_verifies_and_reads_every_acknowledged_record() {
    use std::sync::{Arc, Mutex};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    let (mut daemon, url) =
        spawn_khlangd(&["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()]);
    let url = url.expect("khlangd dev starts");
    let app = dev_token(&data, "registration-app");
    let admin = dev_token(&data, "key-admin");
    // A consent history entry before the backup: the restored vault must not reuse its id.
    let mut c = khlang_client::Client::connect(&url, &app).await.unwrap();
    c.set_consent("backup-subject-0", "public_relations", true).await.unwrap();

    let acknowledged: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..4u64 {
        let (acknowledged, stop, url, app) = (acknowledged.clone(), stop.clone(), url.clone(), app.clone());
        load.push(tokio::spawn(async move {
            let mut c = khlang_client::Client::connect(&url, &app).await.unwrap();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let card = card_number(w * 1_000_000 + i);
                let id =
                    c.put(&format!("backup-subject-{w}"), [("card_number", card.as_str())]).await.unwrap();
                acknowledged.lock().unwrap().push((id.clone(), card));
                c.get(&id, &[], Some("service_delivery")).await.unwrap();
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before: Vec<(String, String)> = acknowledged.lock().unwrap().clone();
    assert!(before.len() > 20, "the load ran ({} writes)", before.len());
    let file = tmp.path().join("vault.backup");
    let file_s = file.to_str().unwrap().to_owned();

    // Not a key admin: refused, no file left behind.
    let refused = khlang(&url, &app, &["operator", "backup", "--output", &file_s]);
    assert_eq!(refused.status.code(), Some(13), "PermissionDenied's exit status");
    assert!(!file.exists());
    let (u, a, f) = (url.clone(), admin.clone(), file_s.clone());
    let taken = tokio::task::spawn_blocking(move || khlang(&u, &a, &["operator", "backup", "--output", &f]))
        .await
        .unwrap();
    assert!(stdout(&taken).contains("backup of "), "{}", stdout(&taken));
    // An existing file is never overwritten.
    let again = khlang(&url, &admin, &["operator", "backup", "--output", &file_s]);
    assert!(!again.status.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let all = acknowledged.lock().unwrap().len();
    assert!(all > before.len(), "writes went on during the backup");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let bytes = std::fs::read(&file).unwrap();
    for canary in [before[0].1.as_bytes(), b"backup-subject-0".as_slice()] {
        assert!(!contains(&bytes, canary), "the backup holds no plaintext value or subject id");
    }
    // The officers keep the vault's audit public key apart from its backups.
    let officer = dev_token(&data, "security-officer");
    let public_key = stdout(&khlang(&url, &officer, &["audit", "public-key"])).trim().to_owned();
    daemon.kill().unwrap();
    daemon.wait().unwrap();

    // Refusals: a folder in use, a damaged file, a cut file, not a backup. None writes anything.
    let restored = tmp.path().join("restored");
    let restored_s = restored.to_str().unwrap();
    let busy = restore(&file, &data, &public_key);
    assert!(String::from_utf8_lossy(&busy.stderr).contains("is not empty"), "{busy:?}");
    let mut flipped = bytes.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x01;
    let cut = bytes[..bytes.len() - 10].to_vec();
    for (name, content, says) in [
        ("flipped", flipped, "damaged"),
        ("cut", cut, "cut short"),
        ("other", b"{\"not\": \"a backup\"}".to_vec(), "not a khlang backup"),
    ] {
        let bad = tmp.path().join(name);
        std::fs::write(&bad, content).unwrap();
        let out = restore(&bad, &restored, &public_key);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{name}: {err}");
        assert!(!restored.exists(), "{name}: a refused restore writes nothing");
    }

    // Edited and re-hashed by someone who knows the format (the checksum recomputed, the
    // signature left as it was, since only the vault's audit key makes one): a data key's tag
    // flipped, an audit entry edited, a contractor's role swapped for another of the same length,
    // one record's entries dropped. The restore refuses each before writing anything.
    let pass = write_passphrase(tmp.path(), khlang_server::dev::DEV_PASSPHRASE);
    let tamper = |what: &str, edit: &dyn Fn(&mut Vec<u8>) -> bool| {
        let mut forged = bytes.clone();
        assert!(edit(&mut forged), "{what}: nothing to edit");
        reseal(&mut forged);
        let (file, dir) = (tmp.path().join(format!("{what}.backup")), tmp.path().join(what));
        std::fs::write(&file, forged).unwrap();
        let out = restore(&file, &dir, &public_key);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("signature does not verify"), "{what}: {err}");
        assert!(!dir.exists(), "{what}: a forged backup writes nothing");
    };
    let edit_frame = |forged: &mut Vec<u8>, edit: &dyn Fn(&mut [u8]) -> bool| {
        frames(forged).into_iter().any(|body| edit(&mut forged[body]))
    };
    // A Store frame of the `vault` tree whose key is a wrapped data key (`d‖id`): its last byte is
    // the key's GCM tag.
    tamper("data-key", &|forged| {
        edit_frame(forged, &|body| {
            let key = body.len() > 9 && body[0] == 1 && &body[1..7] == b"\x05vault" && body[8] == b'd';
            if let (true, Some(last)) = (key, body.last_mut()) {
                *last ^= 1;
            }
            key
        })
    });
    tamper("audit-entry", &|forged| {
        edit_frame(forged, &|body| {
            let needle = br#""rpc":"GetRecord""#;
            let at = (body[0] == 2).then(|| body.windows(needle.len()).position(|w| w == needle)).flatten();
            if let Some(at) = at {
                body[at + needle.len() - 2] = b'X';
            }
            at.is_some()
        })
    });
    tamper("role", &|forged| {
        edit_frame(forged, &|body| {
            let key = b"\x05vault\x12ipostal-contractor";
            if body[0] != 1 || !body[1..].starts_with(key) {
                return false;
            }
            let value = &mut body[1 + key.len()..];
            let role = value.windows(17).rposition(|w| w == b"postal-contractor").unwrap();
            value[role..role + 17].copy_from_slice(b"marketing-officer");
            true
        })
    });
    tamper("dropped-record", &|forged| {
        let Some(body) = frames(forged).into_iter().find(|b| {
            forged[b.start] == 1
                && forged[b.start + 1..].starts_with(b"\x05vault")
                && forged[b.start + 8] == b'r'
        }) else {
            return false;
        };
        forged.drain(body.start - 4..body.end);
        true
    });
    // A genuine backup given another vault's public key: refused as well.
    let other = "00".repeat(32);
    let out = restore(&file, &restored, &other);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another audit public key than the one given"),
        "{out:?}"
    );
    assert!(!restored.exists());
    // Without a public key khlangd says where to get one.
    let out = khlangd_cmd(&["restore", &file_s, "--data-dir", restored_s, "--audit-public-key", "xyz"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("khlang audit public-key"), "{out:?}");

    let out = restore(&file, &restored, &public_key);
    let said = stdout(&out);
    assert!(said.contains("restored ") && said.contains("khlangd verify"), "{said}");
    let verified = khlangd_cmd(&["verify", "--data-dir", restored_s, "--passphrase-file", &pass]);
    let report = stdout(&verified);
    assert!(report.contains("audit log: intact"), "{report}");
    let opened: usize =
        report.split("records: ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(opened >= before.len() && opened <= all, "{opened} records between {} and {all}", before.len());
    assert!(report.contains(", 0 damaged"), "{report}");
    assert!(!report.contains(&before[0].1), "verify shows no value");

    // Served again: every record acknowledged before the backup reads back in full.
    let (mut daemon, url) = spawn_khlangd(&["dev", "--listen", "127.0.0.1:0", "--data-dir", restored_s]);
    let url = url.expect("the restored vault serves");
    let mut clerk =
        khlang_client::Client::connect(&url, &dev_token(&restored, "billing-clerk")).await.unwrap();
    for (id, card) in &before {
        let r = clerk.get(id, &["card_number".into()], Some("billing")).await.unwrap();
        assert_eq!(r.fields["card_number"].expose_secret(), card, "record {id}");
    }
    // Consent ids go on after the backup's: the old history entry stays beside the new one.
    let mut c =
        khlang_client::Client::connect(&url, &dev_token(&restored, "registration-app")).await.unwrap();
    c.set_consent("backup-subject-0", "public_relations", false).await.unwrap();
    let (_, history) = c.consent("backup-subject-0").await.unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    let mut sec =
        khlang_client::Client::connect(&url, &dev_token(&restored, "security-officer")).await.unwrap();
    let entries = sec.query_audit(&khlang_client::AuditQuery::default()).await.unwrap();
    assert!(entries.iter().any(|e| e.rpc == "Backup" && e.identity == "key-admin" && e.outcome == "Ok"));
    assert!(entries.iter().any(|e| e.rpc == "VerifyVault" && e.reason.contains("0 damaged")));
    assert!(sec.verify_audit(&[]).await.unwrap().report.first_break.is_none());
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
