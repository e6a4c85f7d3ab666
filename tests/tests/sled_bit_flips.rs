//! A bit flipped in sled's files (issue 25): wherever it lands, the vault either refuses to open
//! naming the damage, or serves with each damaged record answering `DataLoss`, never `Internal`
//! nor `NotFound`: a record sled's recovery dropped without a word is caught by the records check
//! against the log, and its reads answer `DataLoss` naming it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::path::Path;

use khlang_client::Code;
use khlang_server::{Outcome, Vault};
use khlang_tests::*;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The largest file under `dir`: sled's segments.
fn largest_file(dir: &Path) -> std::path::PathBuf {
    let mut best: Option<(u64, std::path::PathBuf)> = None;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else if best.as_ref().is_none_or(|(len, _)| meta.len() > *len) {
                best = Some((meta.len(), entry.path()));
            }
        }
    }
    best.unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_sleds_files_is_lost_data_named_never_internal() {
    sled_only!("it flips bits in sled's own files");
    let original = tempfile::tempdir().unwrap();
    let server = TestServer::start(original.path()).await;
    let mut app = server.client().await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(app.put(&format!("flip-subject-{i}"), canary_fields()).await.unwrap());
    }
    server.stop().await;
    let db = largest_file(&original.path().join("db"));
    let relative = db.strip_prefix(original.path()).unwrap().to_owned();
    let len = std::fs::metadata(&db).unwrap().len();
    assert!(len > 4096, "{} is sled's data ({len} bytes)", db.display());

    let (mut refused, mut served, mut damaged, mut dropped) = (0, 0, 0, 0);
    let mut seed: u64 = 0x6b68_6c61_6e67;
    for trial in 0..16 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let at = (seed >> 11) % len;
        let bit = (seed >> 3) % 8;
        let copy = tempfile::tempdir().unwrap();
        copy_dir(original.path(), copy.path());
        let target = copy.path().join(&relative);
        let mut bytes = std::fs::read(&target).unwrap();
        bytes[at as usize] ^= 1 << bit;
        std::fs::write(&target, bytes).unwrap();

        let options = TestServer::options(copy.path());
        let opened = Vault::open_or_init(
            copy.path(),
            PASSPHRASE.as_bytes(),
            khlang_keys::SealParams::MINIMUM,
            &options,
        )
        .await;
        let vault = match opened {
            Err(e) => {
                assert_ne!(e.outcome(), Outcome::Internal, "trial {trial} (byte {at}): {e}");
                assert!(!e.to_string().contains(CANARY_CARD), "{e}");
                refused += 1;
                continue;
            }
            Ok(v) => v,
        };
        served += 1;
        let server = TestServer::start_vault(copy.path(), options, vault).await;
        if server.token.is_empty() {
            server.stop().await;
            continue;
        }
        // The records check the server runs after unsealing (an officer's verification runs it
        // too, here so the reads below are judged after it).
        let mut lost = 0;
        if let Some(officer) = server.tokens.get("security-officer") {
            match server.client_with_token(officer).await.verify_audit(&[]).await {
                Ok(v) => lost = v.records.vanished,
                Err(e) => assert_eq!(e.code(), Some(Code::DataLoss), "trial {trial}: {e}"),
            }
        }
        let mut reader = server.client().await;
        for id in &ids {
            match reader.get(id, &[], PURPOSE).await {
                Ok(_) => {}
                Err(e) if e.code() == Some(Code::DataLoss) => {
                    assert!(!e.to_string().contains(CANARY_CARD), "{e}");
                    assert!(e.to_string().contains(id.as_str()), "names the record: {e}");
                    damaged += 1;
                }
                // Never NotFound: the log says every one of them exists.
                Err(e) => panic!("trial {trial} (byte {at} bit {bit}): record {id}: {e}"),
            }
        }
        dropped += lost;
        server.stop().await;
    }
    // The flips landed: damage was found and answered, not only survived.
    assert!(served > 0 && damaged > 0, "{refused} refused, {served} served, {damaged} damaged");
    eprintln!(
        "16 flips in {} ({len} bytes): {refused} refused at open, {served} served: {damaged} reads answered DataLoss, of which {dropped} records sled dropped (reported by the records check)",
        relative.display()
    );
}
