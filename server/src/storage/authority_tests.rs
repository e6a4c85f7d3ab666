#![allow(clippy::unwrap_used)]
use super::*;
use crate::storage::write_index::IndexBase;

fn names(n: &[&str]) -> Vec<String> {
    n.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn the_index_judges_by_the_newest_write_whatever_order_it_learns_them_in() {
    let mut index = WriteIndex::default();
    index.note(5, 50, &names(&["identity:ann", "consent:00:marketing"]));
    // Learnt late (another node's older entry, read by a catch-up): it changes nothing.
    index.note(3, 30, &names(&["identity:ann"]));
    index.note(7, 70, &names(&["-token:t1", "regulations:2"]));
    index.note(2, 20, &names(&["regulations:1"]));
    index.finish_build(Some(1));
    assert!(index.judge("identity:ann", 50).is_ok());
    assert!(index.judge("identity:ann", 30).unwrap_err().contains("older value"));
    assert!(index.judge("token:t1", 70).unwrap_err().contains("removed"));
    assert!(index.judge("identity:bob", 99).unwrap_err().contains("no audited change"));
    assert!(index.expects("consent:00:marketing") && !index.expects("token:t1"));
    assert_eq!(index.newest_regulations, Some(2));
}

#[test]
fn a_write_being_committed_and_a_migration_are_accepted_and_an_archived_log_judges_less() {
    let mut index = WriteIndex::default();
    index.note(4, 40, &names(&[MIGRATED_ALL]));
    index.note(5, 50, &names(&["identity:ann"]));
    index.finish_build(Some(1));
    // Migrated and never written since: accepted; written since: only the newest.
    assert!(index.judge("identity:old", 40).is_ok());
    assert!(index.judge("identity:ann", 40).is_err());
    // A commit in flight: its value may be read a moment before its entry is noted.
    index.begin(60, &names(&["identity:ann", "-token:t2"]));
    assert!(index.judge("identity:ann", 60).is_ok() && index.judge("identity:ann", 50).is_ok());
    index.note(1, 10, &names(&["token:t2"]));
    assert!(!index.expects("token:t2"), "its removal is in flight");
    index.finish(60, &names(&["identity:ann", "-token:t2"]), Some(6));
    assert!(index.judge("identity:ann", 50).is_err() && index.judge("identity:ann", 60).is_ok());
    assert!(index.judge("token:t2", 10).is_err());
    // A commit that failed leaves nothing behind.
    index.begin(70, &names(&["identity:ann"]));
    index.finish(70, &names(&["identity:ann"]), None);
    assert!(index.judge("identity:ann", 70).is_err());
    // A log whose first entries were archived cannot say a key was never written.
    let mut archived = WriteIndex::default();
    archived.finish_build(Some(1000));
    assert!(archived.judge("identity:ann", 1).is_ok());
    // Nothing is judged before the index is built (the unseal builds it first).
    assert!(WriteIndex::default().judge("identity:ann", 1).is_ok());
}

/// An archival's base plus the kept entries judge as the whole log did, whichever is read first.
#[test]
fn a_base_and_the_kept_entries_judge_as_the_whole_log() {
    let entries: [(u64, u64, &[&str]); 5] = [
        (1, 10, &["identity:ann", "token:t1"]),
        (2, 20, &["regulations:1"]),
        (3, 30, &["-token:t1", "identity:ann"]),
        (4, 40, &["consent:00:marketing"]),
        (5, 50, &["identity:ann", "regulations:2"]),
    ];
    let mut whole = WriteIndex::default();
    for (seq, write, n) in entries {
        whole.note(seq, write, &names(n));
    }
    whole.finish_build(Some(1));
    let mut archived = WriteIndex::default();
    for (seq, write, n) in &entries[..3] {
        archived.note(*seq, *write, &names(n));
    }
    let base = archived.base();
    let round_trip: IndexBase = serde_json::from_slice(&serde_json::to_vec(&base).unwrap()).unwrap();
    assert_eq!(round_trip, base);
    let mut rebuilt = WriteIndex::default();
    for (seq, write, n) in &entries[3..] {
        rebuilt.note(*seq, *write, &names(n));
    }
    rebuilt.finish_build_on(Some(4), Some(round_trip));
    for (name, write) in [("identity:ann", 50), ("identity:ann", 30), ("identity:ann", 10), ("token:t1", 10)]
        .into_iter()
        .chain([("consent:00:marketing", 40), ("identity:bob", 60), ("regulations:1", 20)])
    {
        assert_eq!(rebuilt.judge(name, write), whole.judge(name, write), "{name} {write}");
    }
    assert_eq!(rebuilt.newest_regulations, Some(2));
    // Without its base, the same kept entries cannot say bob was never written.
    let mut bare = WriteIndex::default();
    bare.finish_build_on(Some(4), None);
    assert!(bare.judge("identity:bob", 60).is_ok());
    assert!(rebuilt.judge("identity:bob", 60).is_err());
}
