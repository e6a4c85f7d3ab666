//! What every backend of the port must do alike, run against sled and the memory store: the
//! expectations a commit checks, atomicity, walks and their cursors, the audit head.

use super::test_postgres::TestPostgres;
use super::*;

fn record(subject: u8, age: &[u8], wrapped: &[u8]) -> StoredRecord {
    let field = StoredField { name: "age".into(), envelope: age.to_vec() };
    StoredRecord::new(wrapped.to_vec(), [subject; 32], b"sealed subject".to_vec(), vec![field], 1)
}

fn identity(name: &str) -> StoredIdentity {
    StoredIdentity::new(name.into(), "key-admin".into(), "test".into(), 1)
}

/// Every backend, fresh: sled (in the folder), the memory store, and PostgreSQL (a throwaway
/// cluster of the test's own; skipped loudly when no server is installed, see
/// [`TestPostgres::start`]).
struct Backends {
    _dir: tempfile::TempDir,
    _cluster: Option<TestPostgres>,
    stores: Vec<Box<dyn Storage>>,
}

async fn backends(test: &str) -> Backends {
    let dir = tempfile::tempdir().unwrap();
    let sled = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
    let mut stores: Vec<Box<dyn Storage>> = vec![Box::new(sled), Box::new(MemoryStore::new())];
    let cluster = TestPostgres::start(test);
    if let Some(cluster) = &cluster {
        stores.push(Box::new(PgStore::connect(&cluster.database().await).await.unwrap()));
    }
    Backends { _dir: dir, _cluster: cluster, stores }
}

#[tokio::test]
async fn a_stale_version_commits_nothing_and_a_failed_expectation_applies_no_operation() {
    let all = backends("a_stale_version_commits_nothing_and_a_failed_expectation_applies_no_operation").await;
    let stores = &all.stores;
    for store in stores {
        let store = store.as_ref();
        let mut first = Changes::new();
        first.insert_record("r1", &record(7, b"30", b"key-1"));
        assert!(store.commit(first).await.unwrap());
        let (read, version) = store.get_record("r1").await.unwrap().unwrap();
        assert_eq!(read.wrapped_key, b"key-1", "the data key comes back with its record");
        let (mut a, mut b) = (Changes::new(), Changes::new());
        a.replace_record("r1", version.clone(), &record(7, b"31", b""));
        b.replace_record("r1", version, &record(7, b"32", b""));
        b.put_identity(&identity("smuggled"));
        assert!(store.commit(a).await.unwrap());
        assert!(!store.commit(b).await.unwrap(), "the second expected what the first replaced");
        assert!(
            store.get_identity("smuggled").await.unwrap().is_none(),
            "no operation of a refused commit applies"
        );
        let (now, _) = store.get_record("r1").await.unwrap().unwrap();
        assert_eq!(now.fields[0].envelope, b"31");
        assert_eq!(now.wrapped_key, b"key-1", "replacing a record keeps its data key");
    }
}

#[tokio::test]
async fn data_key_expectations_and_re_encryption() {
    let all = backends("data_key_expectations_and_re_encryption").await;
    let stores = &all.stores;
    for store in stores {
        let store = store.as_ref();
        let mut c = Changes::new();
        c.insert_record("r1", &record(1, b"30", b"key-1"));
        assert!(store.commit(c).await.unwrap());
        let walked = store.walk(KeySpace::DataKeys, &Cursor::default(), 10).await.unwrap();
        assert_eq!(walked.len(), 1);
        assert_eq!(walked[0].value, b"key-1");
        let mut rewrap = Changes::new();
        rewrap.replace_data_key("r1", walked[0].version.clone(), b"key-2");
        assert!(store.commit(rewrap).await.unwrap());
        let mut stale = Changes::new();
        stale.replace_data_key("r1", walked[0].version.clone(), b"key-3");
        assert!(!store.commit(stale).await.unwrap(), "the key changed since the walk read it");
        // Re-encryption expects the record and its key as read.
        let (read, version) = store.get_record("r1").await.unwrap().unwrap();
        let mut re = Changes::new();
        re.replace_record_and_key("r1", version.clone(), &read, &record(1, b"new", b"key-4"));
        assert!(store.commit(re).await.unwrap());
        let (now, _) = store.get_record("r1").await.unwrap().unwrap();
        assert_eq!(
            (now.fields[0].envelope.as_slice(), now.wrapped_key.as_slice()),
            (&b"new"[..], &b"key-4"[..])
        );
        let mut again = Changes::new();
        again.replace_record_and_key("r1", version, &read, &record(1, b"x", b"key-5"));
        assert!(!store.commit(again).await.unwrap());
    }
}

#[tokio::test]
async fn identities_requests_and_kek_markers_are_expectations() {
    let all = backends("identities_requests_and_kek_markers_are_expectations").await;
    let stores = &all.stores;
    for store in stores {
        let store = store.as_ref();
        let mut c = Changes::new();
        c.create_identity(&identity("ann"));
        assert!(store.commit(c).await.unwrap());
        let mut twice = Changes::new();
        twice.create_identity(&identity("ann"));
        assert!(!store.commit(twice).await.unwrap(), "the name is taken");
        let ann = store.get_identity("ann").await.unwrap().unwrap();
        let mut revoked = ann.clone();
        revoked.revoked_ms = Some(5);
        let mut r = Changes::new();
        r.expect_identity(&ann);
        r.put_identity(&revoked);
        assert!(store.commit(r).await.unwrap());
        let mut stale = Changes::new();
        stale.expect_identity(&ann);
        assert!(!store.commit(stale).await.unwrap(), "ann is no longer as read");

        let request = StoredIdentityRequest {
            format: 1,
            id: "p1".into(),
            name: "bob".into(),
            role: "key-admin".into(),
            requested_by: "ann".into(),
            requested_ms: 1,
            expires_ms: 2,
            auth: None,
        };
        let mut file = Changes::new();
        file.add_identity_request(&request);
        assert!(store.commit(file).await.unwrap());
        let (mut close, mut close_again) = (Changes::new(), Changes::new());
        close.close_identity_request(&request);
        close_again.close_identity_request(&request);
        assert!(store.commit(close).await.unwrap());
        assert!(!store.commit(close_again).await.unwrap(), "one request is closed once");
        assert!(store.list_identity_requests().await.unwrap().is_empty());

        let mut needs_v1 = Changes::new();
        needs_v1.expect_kek_live(1);
        assert!(!store.commit(needs_v1).await.unwrap(), "there is no v1 yet");
        store.add_kek(1, b"wrapped v1", 1).await.unwrap();
        let mut needs_v1 = Changes::new();
        needs_v1.expect_kek_live(1);
        assert!(store.commit(needs_v1).await.unwrap());
        store.retire_kek(1, 2).await.unwrap();
        let mut needs_v1 = Changes::new();
        needs_v1.expect_kek_live(1);
        assert!(!store.commit(needs_v1).await.unwrap(), "a retired version is not live");
        assert!(store.keks().await.unwrap().is_empty());
        assert_eq!(store.kek_infos().await.unwrap()[0].retired_ms, Some(2));
    }
}

#[tokio::test]
async fn the_audit_head_is_extended_by_one_writer_only() {
    let all = backends("the_audit_head_is_extended_by_one_writer_only").await;
    let stores = &all.stores;
    for store in stores {
        let store = store.as_ref();
        assert_eq!(store.audit_head().await.unwrap(), None);
        let first = AuditHead { seq: 1, hash: [1; 32] };
        let mut a = Changes::new();
        a.audit_entry(1, b"entry one");
        a.extend_audit_head(None, first);
        assert!(store.commit(a).await.unwrap());
        // A second writer that also saw no head cannot extend it: the chain stays linear.
        let mut b = Changes::new();
        b.audit_entry(1, b"a forked entry one");
        b.extend_audit_head(None, AuditHead { seq: 1, hash: [2; 32] });
        assert!(!store.commit(b).await.unwrap());
        assert_eq!(store.audit_head().await.unwrap(), Some(first));
        assert_eq!(store.audit_entries_after(0).await.unwrap(), vec![(1, b"entry one".to_vec())]);
    }
}

/// PostgreSQL, shared by several nodes, counts a version's data keys itself before destroying it
/// (a node's own count cannot see another node's writes in flight).
#[tokio::test]
async fn postgres_refuses_to_destroy_a_kek_that_a_data_key_references() {
    let Some(cluster) = TestPostgres::start("postgres_refuses_to_destroy_a_kek") else { return };
    let store = PgStore::connect(&cluster.database().await).await.unwrap();
    store.add_kek(7, b"wrapped v7", 1).await.unwrap();
    // A wrapped data key's header: format 1, KEK version 7 (big-endian), generation 1.
    let mut wrapped = vec![1u8, 0, 0, 0, 7, 0, 0, 0, 1];
    wrapped.resize(9 + 12 + 32 + 16, 0xAB);
    let mut put = Changes::new();
    put.insert_record("r7", &record(1, b"30", &wrapped));
    assert!(store.commit(put).await.unwrap());
    match store.retire_kek(7, 2).await {
        Err(StoreError::KekInUse { version: 7, refs: 1 }) => {}
        other => panic!("expected KekInUse, got {other:?}"),
    }
    assert_eq!(store.keks().await.unwrap().len(), 1, "v7 is still there");
    let (stored, read) = store.get_record("r7").await.unwrap().unwrap();
    let mut delete = Changes::new();
    delete.delete_record("r7", &stored, read);
    assert!(store.commit(delete).await.unwrap());
    store.retire_kek(7, 3).await.unwrap();
    assert!(store.keks().await.unwrap().is_empty());
}

#[tokio::test]
async fn regulations_versions_are_kept_in_order_and_one_writer_wins() {
    let all = backends("regulations_versions_are_kept_in_order_and_one_writer_wins").await;
    for store in &all.stores {
        let store = store.as_ref();
        assert_eq!(
            (store.regulations().await.unwrap(), store.regulations_serial().await.unwrap()),
            (None, None)
        );
        let version = |serial: u64, text: &str| StoredRegulations {
            format: 1,
            serial,
            text: text.into(),
            loaded_ms: serial,
            loaded_by: "admin".into(),
            auth: None,
        };
        let put = |r: &StoredRegulations| {
            let mut c = Changes::new();
            c.put_regulations(r);
            c
        };
        assert!(store.commit(put(&version(1, "first"))).await.unwrap());
        assert!(!store.commit(put(&version(1, "a rival first"))).await.unwrap(), "serial 1 is taken");
        assert!(store.commit(put(&version(2, "second"))).await.unwrap());
        assert!(!store.commit(put(&version(2, "a rival second"))).await.unwrap(), "two reloads, one wins");
        assert!(!store.commit(put(&version(4, "skipping"))).await.unwrap(), "serials have no gaps");
        assert_eq!(store.regulations_serial().await.unwrap(), Some(2));
        assert_eq!(store.regulations().await.unwrap().unwrap().text, "second");
    }
}

#[tokio::test]
async fn a_key_job_step_applies_over_the_job_it_read_only() {
    let all = backends("a_key_job_step_applies_over_the_job_it_read_only").await;
    for store in &all.stores {
        let store = store.as_ref();
        let job = StoredJob {
            format: 1,
            kind: JobKind::Rewrap { target: 2 },
            cursor: Vec::new(),
            changed: 0,
            skipped: 0,
            total: 10,
            started_ms: 1,
            finished_ms: None,
            requested_by: "admin".into(),
            auth: None,
        };
        let mut start = Changes::new();
        start.expect_job(None);
        start.put_job(&job);
        assert!(store.commit(start).await.unwrap());
        let mut again = Changes::new();
        again.expect_job(None);
        again.put_job(&job);
        assert!(!store.commit(again).await.unwrap(), "a second start saw no job either");
        // Two runners read the same job and step it: the second step is refused whole.
        let step = |changed: u64| {
            let mut c = Changes::new();
            c.expect_job(Some(&job));
            c.put_job(&StoredJob { changed, cursor: vec![changed as u8], ..job.clone() });
            c.put_identity(&identity(&format!("step-{changed}")));
            c
        };
        assert!(store.commit(step(5)).await.unwrap());
        assert!(!store.commit(step(6)).await.unwrap(), "the job moved under the second runner");
        let now = store.job().await.unwrap().unwrap();
        assert_eq!((now.changed, now.cursor), (5, vec![5]));
        assert!(store.get_identity("step-6").await.unwrap().is_none());
    }
}

#[tokio::test]
async fn walks_resume_after_their_cursor_and_deletes_remove_the_index() {
    let all = backends("walks_resume_after_their_cursor_and_deletes_remove_the_index").await;
    let stores = &all.stores;
    for store in stores {
        let store = store.as_ref();
        for (id, subject) in [("a", 1), ("b", 2), ("c", 1)] {
            let mut c = Changes::new();
            c.insert_record(id, &record(subject, b"1", b"key"));
            assert!(store.commit(c).await.unwrap());
        }
        let first = store.walk(KeySpace::Records, &Cursor::default(), 2).await.unwrap();
        assert_eq!(first.iter().map(|w| w.record_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let rest = store.walk(KeySpace::Records, &first[1].cursor, 2).await.unwrap();
        assert_eq!(rest.iter().map(|w| w.record_id.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(StoredRecord::decode(&rest[0].value).unwrap().subject_index, [1; 32]);
        assert_eq!(store.count(KeySpace::Records).await.unwrap(), 3);
        let mut ids: Vec<String> =
            store.records_of_subject(&[1; 32]).await.unwrap().into_iter().map(|(i, _)| i).collect();
        ids.sort();
        assert_eq!(ids, ["a", "c"]);
        let (read, version) = store.get_record("a").await.unwrap().unwrap();
        let mut d = Changes::new();
        d.delete_record("a", &read, version);
        assert!(store.commit(d).await.unwrap());
        assert!(store.get_record("a").await.unwrap().is_none());
        assert_eq!(store.records_of_subject(&[1; 32]).await.unwrap().len(), 1);
        assert_eq!(store.count(KeySpace::DataKeys).await.unwrap(), 2, "its data key went with it");
    }
}

#[tokio::test]
async fn consent_keeps_its_history() {
    let all = backends("consent_keeps_its_history").await;
    let stores = &all.stores;
    for store in stores {
        let store = store.as_ref();
        let consent = |granted, at_ms| StoredConsent {
            format: 1,
            purpose: "marketing".into(),
            granted,
            at_ms,
            by: "dpo".into(),
            auth: None,
        };
        for (granted, at) in [(true, 1), (false, 2)] {
            let mut c = Changes::new();
            c.set_consent(&[9; 32], store.generate_id().await.unwrap(), &consent(granted, at));
            assert!(store.commit(c).await.unwrap());
        }
        assert_eq!(store.get_consent(&[9; 32], "marketing").await.unwrap(), Some(consent(false, 2)));
        let (current, history) = store.consent_of(&[9; 32]).await.unwrap();
        assert_eq!(current, [consent(false, 2)]);
        assert_eq!(history, [consent(true, 1), consent(false, 2)]);
        assert!(store.consent_of(&[8; 32]).await.unwrap().0.is_empty());
    }
}

#[test]
fn lock_hold_percentiles_are_upper_bounds_within_a_factor_of_two() {
    let meter = LockMeter::default();
    assert_eq!(meter.stats(), LockStats::default());
    for us in [100u64, 120, 130, 140, 150, 160, 170, 180, 190, 5_000] {
        meter.record(2, std::time::Duration::from_micros(us));
    }
    let s = meter.stats();
    assert_eq!((s.batches, s.requests, s.max_us), (10, 20, 5_000));
    assert_eq!(s.mean_us, 634);
    assert_eq!(s.p50_us, 256, "the median 150 µs lies under 256");
    assert_eq!(s.p99_us, 8_192, "the slowest batch, 5 ms, lies under 8.2 ms");
}
