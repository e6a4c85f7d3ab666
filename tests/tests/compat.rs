//! A data folder written by an older build opens with this one and reads back unchanged
//! (issue 12: the storage refactor keeps the on-disk layout). The fixture
//! (`tests/fixtures/data-folder-8f59b0a.tar.gz`) was made by `tests/fixtures/make-data-folder.sh`
//! with the build of 8f59b0a, the last before the storage port work: three records of two
//! subjects, a consent, a KEK rotation; development passphrase and tokens (public by design).
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::path::Path;
use std::process::Command;

use khlang_tests::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/data-folder-8f59b0a.tar.gz");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_folder_from_the_build_before_opens_and_reads_back_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    std::fs::create_dir_all(&data).unwrap();
    let untar = Command::new("tar").arg("xzf").arg(FIXTURE).arg("-C").arg(&data).status().unwrap();
    assert!(untar.success(), "could not unpack {FIXTURE}");
    // The folder must be private for the server to open it (tar keeps the modes it recorded).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("expected.json")).unwrap()).unwrap();

    let (mut daemon, url) =
        spawn_khlangd(&["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()]);
    let url = url.unwrap();
    let token = |who: &str| dev_token(Path::new(&data), who);
    let mut dpo = khlang_client::Client::connect(&url, &token("data-protection-officer")).await.unwrap();
    let mut found = 0;
    for subject in ["fixture-1", "fixture-2"] {
        for record in dpo.export_subject(subject).await.unwrap() {
            let want = &expected["records"][&record.record_id];
            assert!(want.is_object(), "unexpected record {}", record.record_id);
            let got: serde_json::Map<String, serde_json::Value> = record
                .fields
                .iter()
                .filter(|(name, _)| name.as_str() != "subject_id")
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.expose_secret().to_owned())))
                .collect();
            assert_eq!(&serde_json::Value::Object(got), want, "record {}", record.record_id);
            found += 1;
        }
    }
    assert_eq!(found, 3, "every record of the fixture");
    let mut app = khlang_client::Client::connect(&url, &token("registration-app")).await.unwrap();
    let (current, _) = app.consent("fixture-1").await.unwrap();
    assert!(current.iter().any(|c| c.purpose == "marketing" && c.granted), "{current:?}");
    let mut admin = khlang_client::Client::connect(&url, &token("key-admin")).await.unwrap();
    let keys = admin.key_status(true).await.unwrap();
    assert!(keys.versions.iter().any(|v| v.version == 2 && v.state == "active"), "{keys:?}");
    let mut sec = khlang_client::Client::connect(&url, &token("security-officer")).await.unwrap();
    let report = sec.verify_audit(&[]).await.unwrap().report;
    assert!(report.first_break.is_none(), "the old log verifies: {report:?}");
    // And it goes on: a new record written and read back.
    let id = app.put("fixture-3", [("age", "44")]).await.unwrap();
    assert_eq!(dpo.export_subject("fixture-3").await.unwrap()[0].record_id, id);
    daemon.0.kill().ok();
}
