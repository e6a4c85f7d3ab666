#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use crate::storage::StoredField;
use crate::storage::test_postgres::TestPostgres;

fn record() -> StoredRecord {
    let field = StoredField { name: "age".into(), envelope: b"30".to_vec() };
    StoredRecord::new(b"key".to_vec(), [1; 32], b"sealed".to_vec(), vec![field], 1)
}

/// The operations are sent together with `COMMIT`: one that fails (here a second insert of
/// the same record id) must take every other operation of its change set with it.
#[tokio::test]
async fn a_failing_operation_sent_with_the_commit_applies_nothing() {
    let Some(pg) = TestPostgres::start("a_failing_operation_sent_with_the_commit_applies_nothing") else {
        return;
    };
    let store = PgStore::connect(&pg.database().await).await.unwrap();
    let mut first = Changes::new();
    first.insert_record("r1", &record());
    assert!(store.commit(first).await.unwrap());
    let mut second = Changes::new();
    second.put_identity(&StoredIdentity::new("smuggled".into(), "key-admin".into(), "t".into(), 1));
    second.insert_record("r1", &record());
    second.put_token(
        "t1",
        &StoredToken { format: 1, identity: "smuggled".into(), mac: [0; 32], created_ms: 1, auth: None },
    );
    assert!(store.commit(second).await.is_err(), "the duplicate insert fails the change set");
    assert!(store.get_identity("smuggled").await.unwrap().is_none(), "nothing of it applied");
    assert!(store.get_token("t1").await.unwrap().is_none(), "nothing of it applied");
    // The connection is usable again: the next change set commits.
    let mut third = Changes::new();
    third.put_identity(&StoredIdentity::new("next".into(), "key-admin".into(), "t".into(), 1));
    assert!(store.commit(third).await.unwrap());
    assert!(store.get_identity("next").await.unwrap().is_some());
}
