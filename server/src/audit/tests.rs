use super::*;

/// Key versions read back exactly as written, and text this build never writes is refused
/// (such an entry reads as damaged; verification still checks its bytes).
#[test]
fn key_versions_keep_their_stored_text() {
    for (text, kv) in [
        ("", KeyVersions::default()),
        ("kek=2", KeyVersions::kek(2)),
        ("kek=1 gen=3", KeyVersions::data_key(1, 3)),
    ] {
        assert_eq!(KeyVersions::parse(text), Some(kv), "{text}");
        assert_eq!(kv.to_string(), text);
        assert_eq!(serde_json::to_string(&kv).unwrap(), format!("\"{text}\""));
    }
    for odd in ["gen=1", "kek=x", "kek=1 kek=2", "kek=1 gen=2 gen=3", "kek=1 other=2", "kek"] {
        assert_eq!(KeyVersions::parse(odd), None, "{odd}");
    }
}

#[tokio::test]
async fn canonical_bytes_are_the_sorted_key_form() {
    let e = AuditEntry {
        decision: Decided::Deny,
        fields: vec!["card_number".into()],
        identity: "billing-clerk".into(),
        purpose: "x\u{1}\"y".into(),
        seq: 42,
        time_ms: 1_795_000_000_000,
        subject: "ab".repeat(32),
        ..AuditEntry::default()
    };
    let via_map = serde_json::to_vec(&serde_json::to_value(&e).unwrap()).unwrap();
    assert_eq!(e.canonical().unwrap(), via_map);
    assert_eq!(embedded_seq(&via_map), Some(42));
}

/// The two-thread verification must name exactly the break one sequential pass names, for
/// damage in either half and right at the seam.
#[tokio::test]
async fn split_verification_matches_a_sequential_pass() {
    use crate::storage::{Durability, SledStore};
    use khlang_keys::{DerivationKey, OsRandom};
    const N: u64 = 6000;
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
    let checkpoints = CheckpointPolicy { every_entries: 700, every: Duration::from_secs(3600) };
    let log = AuditLog::open(&store, dir.path(), &LogOptions { checkpoints, ..LogOptions::default() })
        .await
        .unwrap();
    let dkey = DerivationKey::generate(&OsRandom::new()).unwrap();
    let signer = dkey.audit_signer().unwrap();
    let public_key = signer.public_key().to_vec();
    drop(signer);
    unlock(&log, &store, &dkey).await;
    for i in 0..N {
        let entry = AuditEntry { rpc: "GetRecord".into(), reason: format!("n{i}"), ..AuditEntry::default() };
        assert!(matches!(log.commit(&store, entry, Changes::none()).await.unwrap(), Committed::Done(_)));
    }
    log.checkpoint_now().await.unwrap();
    let sequential = |dir: &Path| {
        let checkpoints: Vec<Checkpoint> = files::checkpoints(dir)
            .unwrap()
            .iter()
            .filter_map(|c| serde_json::from_slice::<StoredCheckpoint>(c).ok()?.to_checkpoint())
            .collect();
        let mut v = ChainVerifier::new(&public_key, checkpoints);
        for item in files::entries(dir, 0) {
            let (seq, value) = item.unwrap();
            match split_stored(&value) {
                Ok((hash, json)) => v.entry(seq, embedded_seq(json), json, hash),
                Err(_) => v.entry(seq, None, &[], &[]),
            }
        }
        v.finish()
    };
    let intact = log.verify(&StoredRecords::read(&store).await.unwrap(), &public_key, &[]).unwrap();
    assert_eq!(intact, sequential(log.dir()));
    assert_eq!((intact.entries, intact.first_break.clone()), (N, None));

    let segments = files::segments(log.dir()).unwrap();
    assert_eq!(segments.len(), 1);
    let path = segments[0].1.clone();
    let original = std::fs::read_to_string(&path).unwrap().trim_end_matches('\0').to_owned();
    let lines: Vec<&str> = original.lines().collect();
    let at = |seq: u64| lines.iter().position(|l| l.starts_with(&format!("e {seq} "))).unwrap();
    let split = N / 2 + 1;
    for (what, seq) in [
        ("edit", 100),
        ("edit", split - 1),
        ("edit", split),
        ("edit", N - 3),
        ("delete", split - 1),
        ("delete", 4000),
    ] {
        let mut forged: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        let i = at(seq);
        if what == "edit" {
            let mut bytes = forged[i].clone().into_bytes();
            let flip = bytes.len() - 40;
            bytes[flip] ^= 1;
            forged[i] = String::from_utf8(bytes).unwrap();
        } else {
            forged.remove(i);
        }
        std::fs::write(&path, forged.join("\n") + "\n").unwrap();
        let report = log.verify_stored(&public_key).unwrap();
        let reference = sequential(log.dir());
        assert_eq!(report.first_break, reference.first_break, "{what} {seq}");
        assert_eq!(report.last_checkpoint, reference.last_checkpoint, "{what} {seq}");
        assert_eq!(report.first_break.as_ref().map(|b| b.seq), Some(seq), "{what} {seq}: {report:?}");
    }
    // Truncation: the newest entries gone, the checkpoint beyond them remains.
    let kept: Vec<&str> =
        lines.iter().copied().filter(|l| !(N - 5..=N).any(|s| l.starts_with(&format!("e {s} ")))).collect();
    std::fs::write(&path, kept.join("\n") + "\n").unwrap();
    let report = log.verify_stored(&public_key).unwrap();
    assert_eq!(report.first_break, sequential(log.dir()).first_break);
    assert!(report.first_break.as_ref().unwrap().reason.contains("truncated"), "{report:?}");
}

async fn unlock(log: &AuditLog, store: &dyn Storage, key: &khlang_keys::DerivationKey) {
    log.unlock(store, key.audit_signer().unwrap(), key.audit_tagger().unwrap(), key.audit_tagger().unwrap())
        .await
        .unwrap();
}

pub(super) async fn test_log(dir: &Path, store: &dyn Storage) -> AuditLog {
    let checkpoints = CheckpointPolicy { every_entries: 1_000_000, every: Duration::from_secs(3600) };
    let log = AuditLog::open(store, dir, &LogOptions { checkpoints, ..LogOptions::default() }).await.unwrap();
    // Changes that write authority values are tagged: the log needs the authority key.
    let derivation = khlang_keys::DerivationKey::generate(&khlang_keys::OsRandom::new()).unwrap();
    log.authority_key().install(Some(std::sync::Arc::new(derivation.authority_tagger().unwrap())));
    log
}

async fn read(log: &AuditLog, store: &dyn Storage, i: u64) -> u64 {
    let entry = AuditEntry { rpc: "GetRecord".into(), reason: format!("r{i}"), ..AuditEntry::default() };
    match log.commit(store, entry, Changes::none()).await.unwrap() {
        Committed::Done(seq) => seq,
        Committed::Conflict => panic!("conflict"),
    }
}

/// A crash in the middle of a write leaves a torn last line: it is cut at open, the chain goes
/// on from the last whole entry, and the log verifies.
#[tokio::test]
async fn a_torn_last_line_is_cut_at_open() {
    use crate::storage::{Durability, SledStore};
    use khlang_keys::{DerivationKey, OsRandom};
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
    let key = DerivationKey::generate(&OsRandom::new()).unwrap();
    let public_key = key.audit_signer().unwrap().public_key().to_vec();
    {
        let log = test_log(dir.path(), &store).await;
        unlock(&log, &store, &key).await;
        for i in 1..=5 {
            read(&log, &store, i).await;
        }
        log.checkpoint_now().await.unwrap();
    }
    let (_, segment) = files::segments(&dir.path().join(files::DIR)).unwrap().pop().unwrap();
    let whole = std::fs::read(&segment).unwrap();
    // The crash came in the middle of the next line, in the zero-filled space after the last.
    let end = whole.iter().position(|b| *b == 0).unwrap();
    let mut torn = whole.clone();
    torn[end..end + 8].copy_from_slice(b"e 6 00ff");
    std::fs::write(&segment, &torn).unwrap();

    let log = test_log(dir.path(), &store).await;
    assert_eq!(log.head().0, 5);
    assert_eq!(std::fs::read(&segment).unwrap(), whole, "the torn line is gone, nothing else");
    unlock(&log, &store, &key).await;
    assert_eq!(read(&log, &store, 6).await, 6);
    let report = log.verify(&StoredRecords::read(&store).await.unwrap(), &public_key, &[]).unwrap();
    assert_eq!((report.entries, report.first_break), (6, None));
}

/// Past 65,536 entries the log goes on in a new segment; readers starting anywhere, the
/// two-thread verification and archival across the seam all see one log.
#[tokio::test]
async fn segments_roll_and_read_as_one_log() {
    use crate::storage::{Durability, SledStore};
    use khlang_keys::{DerivationKey, OsRandom};
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
    let log = test_log(dir.path(), &store).await;
    let dkey = DerivationKey::generate(&OsRandom::new()).unwrap();
    let signer = dkey.audit_signer().unwrap();
    let public_key = signer.public_key().to_vec();
    drop(signer);
    unlock(&log, &store, &dkey).await;
    let n = 65_536 + 300;
    for i in 1..=n {
        read(&log, &store, i).await;
    }
    log.checkpoint_now().await.unwrap();
    let segments = files::segments(log.dir()).unwrap();
    assert_eq!(segments.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 65_537]);
    let from: Vec<u64> = files::entries(log.dir(), 65_530).map(|e| e.unwrap().0).take(10).collect();
    assert_eq!(from, (65_530..65_540).collect::<Vec<_>>());
    let report = log.verify(&StoredRecords::read(&store).await.unwrap(), &public_key, &[]).unwrap();
    assert_eq!((report.entries, report.first_break, report.last_checkpoint), (n, None, n));

    // Archive up to a checkpoint in the second segment: what is left starts after it.
    read(&log, &store, n + 1).await;
    log.checkpoint_now().await.unwrap();
    log.remove_archived(n, b"", 1).unwrap();
    assert_eq!(files::first_seq(log.dir()).unwrap(), Some(n + 1));
    read(&log, &store, n + 2).await;
    let report = log.verify(&StoredRecords::read(&store).await.unwrap(), &public_key, &[]).unwrap();
    assert_eq!((report.entries, report.first_break.clone()), (2, None), "{report:?}");
}

/// Entries a vault of the previous layout kept in sled are copied into the files once, at
/// open, its checkpoints moved, and the log verifies there.
#[tokio::test]
async fn entries_kept_in_sled_are_copied_to_the_files() {
    use crate::storage::{Durability, SledStore};
    use khlang_keys::{DerivationKey, OsRandom};
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
    let dkey = DerivationKey::generate(&OsRandom::new()).unwrap();
    let signer = dkey.audit_signer().unwrap();
    let public_key = signer.public_key().to_vec();
    let tree = store.vault_tree_for_tests();
    let mut hash = GENESIS;
    for seq in 1..=30u64 {
        let entry = AuditEntry { seq, rpc: "GetRecord".into(), ..AuditEntry::default() };
        let json = entry.canonical().unwrap();
        hash = chain_hash(&hash, &json);
        tree.insert([b"a".as_slice(), &seq.to_be_bytes()].concat(), [hash.as_slice(), &json].concat())
            .unwrap();
        if seq % 10 == 0 {
            let cp =
                StoredCheckpoint::from_checkpoint(&signer.sign_checkpoint(seq, &hash, 7, seq - 10).unwrap());
            tree.insert([b"k".as_slice(), &seq.to_be_bytes()].concat(), serde_json::to_vec(&cp).unwrap())
                .unwrap();
        }
    }
    let log = test_log(dir.path(), &store).await;
    assert_eq!(log.head(), (30, hash));
    assert!(store.legacy_checkpoints().await.unwrap().is_empty(), "checkpoints moved to their file");
    drop(signer);
    unlock(&log, &store, &dkey).await;
    read(&log, &store, 31).await;
    let report = log.verify(&StoredRecords::read(&store).await.unwrap(), &public_key, &[]).unwrap();
    assert_eq!((report.entries, report.checkpoints, report.first_break.clone()), (31, 3, None), "{report:?}");
    drop(log);
    let log = test_log(dir.path(), &store).await;
    assert_eq!(log.head().0, 31, "copied once, not again");
}

/// A change carries its entry (and any read entry before it not yet synced) in its sled
/// batch; when the file lost its unsynced tail, the next open puts them back from sled.
#[tokio::test]
async fn entries_a_crash_took_from_the_file_come_back_from_sled() {
    use crate::storage::{Durability, SledStore};
    use khlang_keys::{DerivationKey, OsRandom};
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
    let dkey = DerivationKey::generate(&OsRandom::new()).unwrap();
    let signer = dkey.audit_signer().unwrap();
    let public_key = signer.public_key().to_vec();
    {
        let log = test_log(dir.path(), &store).await;
        for i in 1..=2 {
            read(&log, &store, i).await;
        }
        log.sync_now().unwrap();
        read(&log, &store, 3).await;
        let write = AuditEntry { rpc: "PutRecord".into(), ..AuditEntry::default() };
        assert!(matches!(log.commit(&store, write, Changes::new()).await.unwrap(), Committed::Done(4)));
        store.flush_now().await.unwrap();
    }
    let carried: Vec<u64> = store.audit_entries_after(0).await.unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(carried, vec![3, 4], "the write carried the unsynced read before it");
    // The file's last two lines never reached the disk.
    let (_, segment) = files::segments(&dir.path().join(files::DIR)).unwrap().pop().unwrap();
    let text = std::fs::read_to_string(&segment).unwrap();
    let kept: Vec<&str> = text.lines().take(2).collect();
    std::fs::write(&segment, kept.join("\n") + "\n").unwrap();

    let log = test_log(dir.path(), &store).await;
    assert_eq!(log.head().0, 4);
    let rpcs: Vec<String> = log.read_entries().map(|e| e.unwrap().rpc).collect();
    assert_eq!(rpcs, ["GetRecord", "GetRecord", "GetRecord", "PutRecord"]);
    drop(signer);
    unlock(&log, &store, &dkey).await;
    read(&log, &store, 5).await;
    let report = log.verify(&StoredRecords::read(&store).await.unwrap(), &public_key, &[]).unwrap();
    let rpcs: Vec<String> = log.read_entries().map(|e| e.unwrap().rpc).collect();
    assert_eq!(rpcs[4], "AuditUnproven", "entries the log held unsigned and untagged are named as unproven");
    assert_eq!((report.entries, report.first_break), (6, None));
}

/// An archival interrupted between its two renames leaves the new folder complete and the old
/// one moved aside: the next open finishes the swap instead of starting an empty log.
#[tokio::test]
async fn an_interrupted_archival_is_finished_at_open() {
    use crate::storage::{Durability, SledStore};
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
    {
        let log = test_log(dir.path(), &store).await;
        for i in 1..=4 {
            read(&log, &store, i).await;
        }
        log.sync_now().unwrap();
    }
    let audit = dir.path().join(files::DIR);
    std::fs::rename(&audit, audit.with_extension("new")).unwrap();
    let log = test_log(dir.path(), &store).await;
    assert_eq!(log.head().0, 4, "the complete new folder took the log's place");
    drop(log);
    std::fs::create_dir_all(audit.with_extension("old")).unwrap();
    std::fs::create_dir_all(audit.with_extension("new")).unwrap();
    let log = test_log(dir.path(), &store).await;
    assert_eq!(log.head().0, 4);
    assert!(!audit.with_extension("old").exists() && !audit.with_extension("new").exists());
}

/// A change sled cannot store leaves neither the change nor its entry in sled; the log's entry
/// for the request says it failed, and the chain goes on.
#[tokio::test]
async fn a_change_that_cannot_be_stored_is_logged_as_failed() {
    use crate::storage::{Durability, JobKind, SledStore, StoredJob};
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
    let log = test_log(dir.path(), &store).await;
    read(&log, &store, 1).await;
    let job = StoredJob {
        format: 1,
        kind: JobKind::Reencrypt,
        cursor: vec![],
        changed: 0,
        skipped: 0,
        total: 0,
        started_ms: 0,
        finished_ms: Some(1),
        requested_by: String::new(),
        auth: None,
    };
    let mut changes = Changes::new();
    changes.put_job(&job);
    store.inject_apply_failure(true);
    let write = AuditEntry { rpc: "Reencrypt".into(), outcome: Outcome::Ok, ..AuditEntry::default() };
    assert!(log.commit(&store, write, changes).await.is_err());
    store.inject_apply_failure(false);
    assert!(store.job().await.unwrap().is_none(), "the change was not stored");
    assert!(store.audit_entries_after(0).await.unwrap().is_empty(), "nor its entry in sled");
    assert_eq!(read(&log, &store, 3).await, 3, "the chain goes on");
    let entries: Vec<AuditEntry> = {
        log.write_through().unwrap();
        log.read_entries().map(Result::unwrap).collect()
    };
    let failed = &entries[1];
    assert_eq!((failed.seq, failed.rpc.as_str(), failed.outcome.as_str()), (2, "Reencrypt", "Internal"));
    assert_eq!(failed.reason, "the change could not be stored");
}
