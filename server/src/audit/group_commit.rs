//! Group commit of changes on a store this node owns (sled; the shared chain batches in
//! `shared.rs`). A request that changes data puts its entry and change in the queue and waits
//! for `order`; whoever takes it commits everything queued as one group: each member's
//! expectations are checked against the store and against what the members before it in the
//! group write, the survivors' entries are chained in order, and their changes, entries, one
//! chain-head update and one head tag go to the store as one batch. A member whose expectation
//! fails gets `Conflict` (no seq used) and prepares again, as when it committed alone; the
//! store's flush that follows (`Storage::durable`, grouped too) acknowledges all of them.
//!
//! Nothing between the store's commit returning and the in-memory head moving awaits, so a
//! leader whose request is dropped cannot leave the two apart.

use std::collections::HashSet;

use tokio::sync::oneshot;

use super::{AuditEntry, AuditLog, Committed, TaggedHead, chain_hash, encode_tagged, lock, unavailable};
use crate::clock::now_ms;
use crate::storage::overlap::Touch;
use crate::storage::{AuditHead, Changes, Expect, Storage};
use crate::{Outcome, VaultError};

/// Most members in one group: bounds one batch's size and the wait of its first member.
const MAX_GROUP: usize = 256;

/// A change waiting for a committer.
pub(super) struct Waiting {
    entry: AuditEntry,
    changes: Changes,
    reply: oneshot::Sender<Result<Committed, VaultError>>,
}

/// A member that survived the checks, chained.
struct Chained {
    entry: AuditEntry,
    canonical: Vec<u8>,
    hash: [u8; 32],
    reply: oneshot::Sender<Result<Committed, VaultError>>,
}

impl AuditLog {
    /// Commits `entry` with `changes` in the next group (see the module doc).
    pub(super) async fn commit_grouped(
        &self,
        store: &dyn Storage,
        entry: AuditEntry,
        changes: Changes,
    ) -> Result<Committed, VaultError> {
        let (reply, mut answer) = oneshot::channel();
        lock(&self.waiting).push(Waiting { entry, changes, reply });
        loop {
            // Answered by a committer that took this change, or take `order` and commit the
            // queue: whichever comes first (an answered request does not wait for `order`).
            let order = tokio::select! {
                biased;
                done = &mut answer => return done.unwrap_or(Err(VaultError::AuditUnavailable)),
                order = self.order.lock() => order,
            };
            match answer.try_recv() {
                Ok(done) => return done,
                // A committer took this change and was dropped before it answered.
                Err(oneshot::error::TryRecvError::Closed) => return Err(VaultError::AuditUnavailable),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let group: Vec<Waiting> = {
                let mut waiting = lock(&self.waiting);
                let n = waiting.len().min(MAX_GROUP);
                waiting.drain(..n).collect()
            };
            self.commit_group(store, group).await;
            drop(order);
            // Queued behind a full group: the loop takes `order` again.
        }
    }

    /// Commits one group, `order` held; every member is answered.
    async fn commit_group(&self, store: &dyn Storage, group: Vec<Waiting>) {
        // A request dropped while it waited (its caller gone) is not committed: as when it
        // committed alone, a cancelled request changes nothing.
        let mut group: Vec<Waiting> = group.into_iter().filter(|w| !w.reply.is_closed()).collect();
        if group.is_empty() {
            return;
        }
        if group.len() == 1 {
            if let Some(w) = group.pop() {
                let done = self.commit_locked(store, w.entry, w.changes).await;
                let _ = w.reply.send(done);
            }
            return;
        }
        // Against the store: what each member read is still there (nobody else commits now).
        // Most members count on the same KEK being live: asked once per group.
        let mut live_keks: Vec<u32> = Vec::new();
        let mut checked = Vec::with_capacity(group.len());
        'members: for w in group {
            for e in w.changes.expectations() {
                let kek = match e {
                    Expect::KekLive(v) => Some(*v),
                    _ => None,
                };
                if kek.is_some_and(|v| live_keks.contains(&v)) {
                    continue;
                }
                match store.holds_now(e).await {
                    Ok(true) if kek.is_some() => live_keks.extend(kek),
                    Ok(true) => {}
                    Ok(false) => {
                        let _ = w.reply.send(Ok(Committed::Conflict));
                        continue 'members;
                    }
                    Err(e) => {
                        let _ = w.reply.send(Err(e.into()));
                        continue 'members;
                    }
                }
            }
            checked.push(w);
        }
        // Against the members before it, then chained: under the head's lock, no await.
        let mut batch = Changes::new();
        let mut chained: Vec<Chained> = Vec::with_capacity(checked.len());
        let (stored_head, next) = {
            let head = lock(&self.head);
            if let Err(e) = self.file.check_writable() {
                let _logged = unavailable(e);
                for w in checked {
                    let _ = w.reply.send(Err(VaultError::AuditUnavailable));
                }
                return;
            }
            let mut written: HashSet<Touch> = HashSet::new();
            let (mut seq, mut hash) = (head.seq, head.hash);
            for w in checked {
                let Waiting { mut entry, changes, reply } = w;
                if changes.expectations().iter().filter_map(|e| e.touches()).any(|t| written.contains(&t)) {
                    let _ = reply.send(Ok(Committed::Conflict));
                    continue;
                }
                entry.seq = seq + 1;
                entry.time_ms = now_ms();
                entry.bound();
                let canonical = match entry.canonical() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                        continue;
                    }
                };
                written.extend(changes.ops().iter().filter_map(|op| op.touches()));
                let h = chain_hash(&hash, &canonical);
                batch.merge(changes);
                batch.audit_entry(entry.seq, &[h.as_slice(), &canonical].concat());
                (seq, hash) = (entry.seq, h);
                chained.push(Chained { entry, canonical, hash: h, reply });
            }
            if chained.is_empty() {
                return;
            }
            // Entries before the group not yet on disk travel with it, as with one change.
            let synced = self.file.synced_seq();
            for (s, earlier) in head.unsynced.iter().filter(|(s, _)| *s > synced) {
                batch.audit_entry(*s, earlier);
            }
            if let Some(keys) = lock(&self.keys).as_ref() {
                let tagged: TaggedHead = (seq, hash, keys.tagger.tag(seq, &hash));
                batch.audit_head_tag(&encode_tagged(&tagged));
            }
            let next = AuditHead { seq, hash };
            batch.extend_audit_head(head.stored, next);
            (head.stored, next)
        };
        let stored = store.commit(batch).await;
        // From here to the answers: no await (see the module doc).
        match stored {
            Ok(true) => {
                let mut head = lock(&self.head);
                head.unsynced.clear();
                head.stored = Some(next);
                let mut failed = false;
                let mut answers = Vec::with_capacity(chained.len());
                for m in chained {
                    // The change and its entry are in the store; the file gets the entry too
                    // (taken back from the store at open if this append is lost).
                    if !failed
                        && let Err(e) =
                            self.append_file(m.entry.seq, m.entry.time_ms, &m.hash, &m.canonical, false)
                    {
                        let _logged = unavailable(e);
                        failed = true;
                    }
                    head.seq = m.entry.seq;
                    head.hash = m.hash;
                    answers.push((m.reply, if failed { None } else { Some(m.entry.seq) }));
                }
                let checkpointed = self.checkpoint_if_due(&mut head);
                drop(head);
                let checkpoint_failed = checkpointed.is_err();
                for (reply, seq) in answers {
                    let _ = reply.send(match seq {
                        Some(seq) if !checkpoint_failed => Ok(Committed::Done(seq)),
                        _ => Err(VaultError::AuditUnavailable),
                    });
                }
            }
            Ok(false) => {
                // Checked above, so only the chain head can have moved (another writer) — or
                // the store changed between the check and the commit: nothing was written and
                // no seq used; fail closed on a moved head, else every member prepares again.
                let moved = match store.audit_head().await {
                    Ok(now) => now != stored_head,
                    Err(_) => true,
                };
                if moved {
                    tracing::error!("the audit chain head in the store moved under this vault");
                }
                for m in chained {
                    let _ = m.reply.send(if moved {
                        Err(VaultError::AuditUnavailable)
                    } else {
                        Ok(Committed::Conflict)
                    });
                }
            }
            Err(e) => {
                // Neither the changes nor their entries were stored: each entry says its change
                // failed, chained from the head as it was.
                tracing::error!(error = %e, members = chained.len(), "a group of changes and their audit entries could not be stored");
                let mut head = lock(&self.head);
                for m in chained {
                    let mut entry = m.entry;
                    entry.seq = head.seq + 1;
                    entry.outcome = Outcome::Internal;
                    entry.reason = "the change could not be stored".into();
                    entry.write = 0;
                    entry.writes.clear();
                    let written = entry.canonical().map_err(VaultError::from).and_then(|canonical| {
                        let hash = chain_hash(&head.hash, &canonical);
                        self.append_file(entry.seq, entry.time_ms, &hash, &canonical, true)
                            .map_err(unavailable)?;
                        // Until the file's sync, the next change carries it into the store, as
                        // a read's entry: what the store holds never skips one.
                        head.unsynced.push_back((entry.seq, [hash.as_slice(), &canonical].concat()));
                        head.seq = entry.seq;
                        head.hash = hash;
                        Ok(())
                    });
                    let _ = m.reply.send(match written {
                        Ok(()) => Err(VaultError::Storage(crate::StoreError::Flush(e.to_string()))),
                        Err(w) => Err(w),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::storage::models::{StoredField, StoredRecord};
    use crate::storage::{Durability, SledStore};

    fn record(age: &[u8]) -> StoredRecord {
        let field = StoredField { name: "age".into(), envelope: age.to_vec() };
        StoredRecord::new(b"key".to_vec(), [1; 32], b"sealed subject".to_vec(), vec![field], 1)
    }

    fn member(reason: &str, changes: Changes) -> (Waiting, oneshot::Receiver<Result<Committed, VaultError>>) {
        let (reply, answer) = oneshot::channel();
        let entry = AuditEntry { rpc: "UpdateRecord".into(), reason: reason.into(), ..AuditEntry::default() };
        (Waiting { entry, changes, reply }, answer)
    }

    fn answered(rx: &mut oneshot::Receiver<Result<Committed, VaultError>>) -> Option<u64> {
        match rx.try_recv().unwrap().unwrap() {
            Committed::Done(seq) => Some(seq),
            Committed::Conflict => None,
        }
    }

    /// Two members counting on the same version: the first commits, the second is sent back
    /// without a seq; a member whose read an earlier group made stale is sent back too; the
    /// others commit in one batch with consecutive seqs, and the store's head is the last one.
    #[tokio::test]
    async fn members_that_count_on_what_the_group_writes_are_sent_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
        let log = super::super::tests::test_log(dir.path(), &store).await;
        let mut put = Changes::new();
        put.insert_record("r1", &record(b"1"));
        put.insert_record("r2", &record(b"1"));
        let entry = AuditEntry { rpc: "PutRecord".into(), ..AuditEntry::default() };
        let Committed::Done(first) = log.commit(&store, entry, put).await.unwrap() else { panic!() };
        let (_, v1) = store.get_record("r1").await.unwrap().unwrap();
        let (_, v2) = store.get_record("r2").await.unwrap().unwrap();
        // r2 changes before the group: a member still holding its old version is stale.
        let mut bump = Changes::new();
        bump.replace_record("r2", v2.clone(), &record(b"2"));
        let entry = AuditEntry { rpc: "UpdateRecord".into(), ..AuditEntry::default() };
        assert!(matches!(log.commit(&store, entry, bump).await.unwrap(), Committed::Done(_)));

        let mut a = Changes::new();
        a.replace_record("r1", v1.clone(), &record(b"a"));
        let mut b = Changes::new();
        b.replace_record("r1", v1.clone(), &record(b"b"));
        let mut stale = Changes::new();
        stale.replace_record("r2", v2, &record(b"stale"));
        let mut other = Changes::new();
        other.insert_record("r3", &record(b"3"));
        let (ma, mut ra) = member("a", a);
        let (mb, mut rb) = member("b", b);
        let (ms, mut rs) = member("stale", stale);
        let (mo, mut ro) = member("other", other);
        log.commit_group(&store, vec![ma, mb, ms, mo]).await;
        let (sa, so) = (answered(&mut ra), answered(&mut ro));
        assert_eq!((sa, answered(&mut rb), answered(&mut rs)), (Some(first + 2), None, None));
        assert_eq!(so, Some(first + 3), "the survivors' seqs follow one another");
        let (r1, _) = store.get_record("r1").await.unwrap().unwrap();
        assert_eq!(r1.fields[0].envelope, b"a");
        assert!(store.get_record("r3").await.unwrap().is_some());
        assert_eq!(store.audit_head().await.unwrap().unwrap().seq, first + 3);
    }
}
