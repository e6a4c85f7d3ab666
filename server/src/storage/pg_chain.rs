//! The audit chain in PostgreSQL, one for every node on the database: each node appends a batch
//! of entries (with the change sets they record) in one transaction that holds the head row
//! `FOR UPDATE`, so seqs are gap-free and strictly ordered across nodes, and commits it
//! synchronously (one WAL flush per batch: the group commit). Its reader (query, export,
//! verification) is synchronous, like the files', and runs its queries on a thread of its own.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use khlang_keys::audit_chain::GENESIS;

use super::{
    BUMP_CREDENTIALS, Credentials, Statement, TxError, db, holds, i64_to_u64, lock_order, retryable,
    statements, u64_to_i64, writes_credentials,
};
use crate::StoreError;
use crate::storage::{AuditHead, ChainTip, Changes, Expect, Op, Seal, SharedChain};

/// How many times a batch is rerun after a deadlock or serialisation failure.
const APPEND_ATTEMPTS: usize = 8;
/// Entries the reader fetches per query.
const PAGE: i64 = 1000;

pub(super) struct PgChain {
    /// Synchronous commits: a batch is durable when its `COMMIT` returns.
    pub(super) pool: super::Conns,
    pub(super) credentials: Arc<std::sync::Mutex<Credentials>>,
    pub(super) reader: Reader,
    pub(super) held: crate::storage::LockMeter,
    /// Each batch is one synchronous commit: one flush for every request it carried.
    pub(super) stats: Arc<crate::storage::FlushStats>,
}

/// One change set of a batch, as the transaction applies it.
struct Set {
    ops: Vec<Op>,
    expect: Vec<Expect>,
    statements: Vec<Statement>,
    /// What it touches, for refusing a second set of the same batch on the same row: both would
    /// have read the row before either wrote it.
    keys: Vec<String>,
}

fn expect_key(e: &Expect) -> Option<String> {
    match e {
        Expect::Record { id, .. } | Expect::DataKey { id, .. } | Expect::DataKeyIs { id, .. } => {
            Some(format!("r:{id}"))
        }
        Expect::Identity { name, .. } => Some(format!("i:{name}")),
        Expect::IdentityRequest { id, .. } => Some(format!("q:{id}")),
        Expect::Job(_) => Some("j".into()),
        Expect::Regulations(_) => Some("g".into()),
        Expect::KekLive(_) | Expect::AuditHead(_) => None,
    }
}

fn op_key(op: &Op) -> Option<String> {
    match op {
        Op::InsertRecord { id, .. }
        | Op::ReplaceRecord { id, .. }
        | Op::ReplaceDataKey { id, .. }
        | Op::DeleteRecord { id, .. } => Some(format!("r:{id}")),
        Op::PutIdentity(identity) => Some(format!("i:{}", identity.name)),
        Op::PutIdentityRequest(r) => Some(format!("q:{}", r.id)),
        Op::RemoveIdentityRequest(id) => Some(format!("q:{id}")),
        Op::PutToken { id, .. } | Op::RemoveToken(id) => Some(format!("t:{id}")),
        Op::SetConsent { subject_index, consent, .. } | Op::RetagConsent { subject_index, consent, .. } => {
            Some(format!("c:{}:{}", hex::encode(subject_index), consent.purpose))
        }
        Op::PutJob(_) => Some("j".into()),
        Op::PutRegulations(_) | Op::RetagRegulations(_) => Some("g".into()),
        Op::AuditEntry { .. } | Op::AuditRecord { .. } | Op::AuditHead(_) => None,
    }
}

fn tip_from(row: &tokio_postgres::Row) -> Result<ChainTip, StoreError> {
    let seq: Option<i64> = row.get(0);
    let hash: Option<Vec<u8>> = row.get(1);
    let (seq, hash) = match (seq, hash) {
        (Some(seq), Some(hash)) => {
            (i64_to_u64(seq, "audit head")?, hash.try_into().map_err(|_| StoreError::Corrupt("audit head"))?)
        }
        _ => (0, GENESIS),
    };
    Ok(ChainTip {
        seq,
        hash,
        signed_seq: i64_to_u64(row.get(2), "audit head")?,
        signed_ms: i64_to_u64(row.get(3), "audit head")?,
    })
}

const TIP: &str = "SELECT seq, hash, signed_seq, signed_ms FROM audit_head WHERE id = 1";

type Param = Box<dyn tokio_postgres::types::ToSql + Sync + Send>;

fn borrowed(params: &[Param]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect()
}

const INSERT_ENTRIES: &str = "INSERT INTO audit_entries (seq, value, tag)
     SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::bytea[])";
const INSERT_CHECKPOINT: &str = "INSERT INTO audit_checkpoints (seq, value) VALUES ($1, $2)";
const UPDATE_HEAD: &str =
    "UPDATE audit_head SET seq = $1, hash = $2, signed_seq = $3, signed_ms = $4 WHERE id = 1";

impl PgChain {
    /// One attempt at a batch, in two round trips (as a single change set's commit).
    async fn append_once(&self, sets: &[Option<Set>], seal: &mut Seal<'_>) -> Result<Vec<bool>, TxError> {
        use deadpool_postgres::GenericClient;
        use futures_util::future::{join, join3, try_join_all};
        let c = self.pool.get().await?;
        let lock_head = c.prepare_cached(&format!("{TIP} FOR UPDATE")).await?;
        let fixed = try_join_all(
            [INSERT_ENTRIES, INSERT_CHECKPOINT, UPDATE_HEAD, BUMP_CREDENTIALS]
                .map(|sql| c.prepare_cached(sql)),
        )
        .await?;
        let mut prepared = Vec::with_capacity(sets.len());
        for set in sets {
            let statements = match set {
                Some(set) => try_join_all(set.statements.iter().map(|s| c.prepare_cached(s.sql))).await?,
                None => Vec::new(),
            };
            prepared.push(statements);
        }
        // Round trip 1: BEGIN, the head's lock (first: every writer of every node queues there
        // before it locks anything else), every set's expectations.
        let expectations = sets.iter().flatten().flat_map(|s| s.expect.iter());
        let (begun, head, held) = join3(
            c.batch_execute("BEGIN"),
            c.query_one(&lock_head, &[]),
            try_join_all(expectations.map(|e| holds(&c, e))),
        )
        .await;
        begun?;
        let (head, held) = match (head, held) {
            (Ok(head), Ok(held)) => (head, held),
            (Err(e), _) => {
                c.batch_execute("ROLLBACK").await?;
                return Err(e.into());
            }
            (_, Err(e)) => {
                c.batch_execute("ROLLBACK").await?;
                return Err(e);
            }
        };
        // The lock is ours from here (its answer) to COMMIT's answer.
        let locked = std::time::Instant::now();
        let tip = tip_from(&head)?;
        // Which sets apply: all their expectations held, and no earlier set of the batch that
        // applies touches what they touch. A set that does not apply gives back the names it
        // claimed (the placeholder rows its expectations inserted).
        let mut applied = Vec::with_capacity(sets.len());
        let mut taken: HashSet<&str> = HashSet::new();
        let mut undo: Vec<(&'static str, Param)> = Vec::new();
        let mut results = held.into_iter();
        for set in sets {
            let Some(set) = set else {
                applied.push(true);
                continue;
            };
            let mine: Vec<bool> = results.by_ref().take(set.expect.len()).collect();
            let ok = set.keys.iter().all(|k| !taken.contains(k.as_str())) && mine.iter().all(|h| *h);
            if ok {
                taken.extend(set.keys.iter().map(String::as_str));
            } else {
                for (e, held) in set.expect.iter().zip(&mine) {
                    match e {
                        Expect::Identity { name, is: None } if *held => undo.push((
                            "DELETE FROM identities WHERE name = $1 AND body = ''",
                            Box::new(name.clone()),
                        )),
                        Expect::IdentityRequest { id, is: None } if *held => undo.push((
                            "DELETE FROM identity_requests WHERE id = $1 AND body = ''",
                            Box::new(id.clone()),
                        )),
                        _ => {}
                    }
                }
            }
            applied.push(ok);
        }
        let chain = match seal(&tip, &applied) {
            Ok(chain) => chain,
            Err(e) => {
                c.batch_execute("ROLLBACK").await?;
                return Err(e.into());
            }
        };
        let mut undo_prepared = Vec::with_capacity(undo.len());
        for (sql, _) in &undo {
            undo_prepared.push(c.prepare_cached(sql).await?);
        }
        // Round trip 2: the sets that apply, the entries, the head, COMMIT.
        let head = match (chain.head, chain.entries.last()) {
            (Some(h), _) => Some(h),
            (None, Some((seq, value))) => {
                // A stored entry is `hash (32 bytes) ‖ canonical JSON`.
                let hash = value.get(..32).and_then(|h| <[u8; 32]>::try_from(h).ok());
                Some(AuditHead { seq: *seq, hash: hash.ok_or(StoreError::Corrupt("audit entry"))? })
            }
            // A checkpoint alone moves only the signed head.
            (None, None) => chain.signed.map(|_| AuditHead { seq: tip.seq, hash: tip.hash }),
        };
        let (signed_seq, signed_ms) = chain.signed.unwrap_or((tip.signed_seq, tip.signed_ms));
        let mut owned: Vec<(&tokio_postgres::Statement, Vec<Param>)> = Vec::new();
        for (statement, (_, key)) in undo_prepared.iter().zip(undo) {
            owned.push((statement, vec![key]));
        }
        if !chain.entries.is_empty() {
            let n = chain.entries.len();
            let mut seqs = Vec::with_capacity(n);
            let mut values = Vec::with_capacity(n);
            let mut tags: Vec<Option<Vec<u8>>> = vec![None; n];
            for (seq, value) in chain.entries {
                seqs.push(u64_to_i64(seq, "audit seq")?);
                values.push(value);
            }
            tags[n - 1] = chain.tag;
            owned.push((&fixed[0], vec![Box::new(seqs), Box::new(values), Box::new(tags)]));
        }
        if let Some(cp) = chain.checkpoint {
            owned.push((&fixed[1], vec![Box::new(u64_to_i64(signed_seq, "checkpoint seq")?), Box::new(cp)]));
        }
        if let Some(head) = head {
            owned.push((
                &fixed[2],
                vec![
                    Box::new(u64_to_i64(head.seq, "audit head")?),
                    Box::new(head.hash.to_vec()),
                    Box::new(u64_to_i64(signed_seq, "audit head")?),
                    Box::new(u64_to_i64(signed_ms, "audit head")?),
                ],
            ));
        }
        let live = || sets.iter().zip(&applied).filter_map(|(s, ok)| s.as_ref().filter(|_| *ok));
        if live().flat_map(|s| &s.ops).any(writes_credentials) {
            owned.push((&fixed[3], Vec::new()));
        }
        let mut sends: Vec<(&tokio_postgres::Statement, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>)> =
            Vec::new();
        for ((set, ok), statements) in sets.iter().zip(&applied).zip(&prepared) {
            if let (Some(set), true) = (set, *ok) {
                for (s, p) in set.statements.iter().zip(statements) {
                    sends.push((p, borrowed(&s.params)));
                }
            }
        }
        for (statement, params) in &owned {
            sends.push((statement, borrowed(params)));
        }
        let executes = try_join_all(sends.iter().map(|(s, p)| c.execute(*s, p)));
        let (done, committed) = join(executes, c.batch_execute("COMMIT")).await;
        done?;
        committed?;
        self.held.record(sets.len(), locked.elapsed());
        crate::metrics::audit_batch(sets.len(), locked.elapsed());
        self.stats.flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.writes.fetch_add(sets.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(applied)
    }
}

#[async_trait::async_trait]
impl SharedChain for PgChain {
    async fn append(&self, batch: Vec<Changes>, seal: &mut Seal<'_>) -> Result<Vec<bool>, StoreError> {
        let mut sets = Vec::with_capacity(batch.len());
        for changes in batch {
            if changes.is_empty() {
                sets.push(None);
                continue;
            }
            let (ops, mut expect) = changes.into_parts();
            expect.sort_by_key(lock_order);
            let mut all = Vec::new();
            for op in &ops {
                statements(op, &mut all)?;
            }
            let mut keys: Vec<String> =
                expect.iter().filter_map(expect_key).chain(ops.iter().filter_map(op_key)).collect();
            keys.sort();
            keys.dedup();
            sets.push(Some(Set { ops, expect, statements: all, keys }));
        }
        let ops = || sets.iter().flatten().flat_map(|s| &s.ops);
        // Before and after: a read racing the commit sees the generation move and caches nothing.
        self.cache().invalidate(ops());
        let mut attempt = 0;
        let applied = loop {
            attempt += 1;
            match self.append_once(&sets, seal).await {
                Ok(applied) => break applied,
                Err(TxError::Db(e)) if retryable(&e) && attempt < APPEND_ATTEMPTS => continue,
                Err(TxError::Db(e)) => return Err(db(e)),
                Err(TxError::Store(e)) => return Err(e),
            }
        };
        self.cache().invalidate(ops());
        Ok(applied)
    }

    async fn tip(&self) -> Result<ChainTip, StoreError> {
        let c = self.pool.get().await?;
        let row = c.query_one(&c.prepare_cached(TIP).await?, &[]).await.map_err(db)?;
        tip_from(&row)
    }

    fn rows(&self) -> Reader {
        self.reader.clone()
    }

    fn lock_stats(&self) -> crate::storage::LockStats {
        self.held.stats()
    }
}

impl PgChain {
    fn cache(&self) -> std::sync::MutexGuard<'_, Credentials> {
        // A panic while holding it cannot leave it half-updated: every update is one map call.
        self.credentials.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How the reader's thread connects (its own connection, on its own runtime).
#[derive(Clone)]
pub(super) enum Connect {
    Plain(tokio_postgres::Config),
    Tls(tokio_postgres::Config, tokio_postgres_rustls::MakeRustlsConnect),
}

impl Connect {
    async fn client(&self) -> Result<tokio_postgres::Client, StoreError> {
        match self {
            Self::Plain(config) => {
                let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(db)?;
                tokio::spawn(connection);
                Ok(client)
            }
            Self::Tls(config, tls) => {
                let (client, connection) = config.connect(tls.clone()).await.map_err(db)?;
                tokio::spawn(connection);
                Ok(client)
            }
        }
    }
}

/// `(first seq, the head row)`.
pub type Ends = (Option<u64>, Option<AuditHead>);
type Reply<T> = std::sync::mpsc::SyncSender<Result<T, StoreError>>;

/// A stored entry: `(seq, hash ‖ JSON, head tag)`.
pub type Row = (u64, Vec<u8>, Option<Vec<u8>>);

enum Ask {
    Entries {
        from: u64,
        limit: i64,
        reply: std::sync::mpsc::SyncSender<Result<Vec<Row>, StoreError>>,
    },
    Checkpoints {
        reply: std::sync::mpsc::SyncSender<Result<Vec<Vec<u8>>, StoreError>>,
    },
    /// `(first seq, the head row)`.
    Ends {
        reply: Reply<Ends>,
    },
    RemoveUpto {
        last: u64,
        base: Vec<u8>,
        /// The first entry the base was built on: another archival since, and nothing goes.
        from: u64,
        reply: std::sync::mpsc::SyncSender<Result<(), StoreError>>,
    },
    Base {
        reply: Reply<Option<Vec<u8>>>,
    },
}

/// The `meta` row that holds an archived chain's signed base (see `audit::archive_base`).
const ARCHIVE_BASE_KEY: &str = "audit_archive_base";

/// The chain's reader: its queries run on a thread of its own (a current-thread runtime and one
/// connection), so the audit log's synchronous reads block neither on nor inside the server's
/// runtime.
#[derive(Clone)]
pub struct Reader {
    asks: std::sync::mpsc::Sender<Ask>,
    location: Arc<PathBuf>,
}

impl Reader {
    pub(super) fn start(connect: Connect, location: String) -> Result<Self, StoreError> {
        let (asks, rx) = std::sync::mpsc::channel::<Ask>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("audit reader runtime: {e}")))?;
        std::thread::Builder::new()
            .name("khlang-audit-reader".into())
            .spawn(move || {
                let mut client: Option<tokio_postgres::Client> = None;
                while let Ok(ask) = rx.recv() {
                    runtime.block_on(async {
                        // The connection's task runs only while this thread asks, so a server
                        // that went away (a failover) shows only when the connection is used:
                        // probe it, and connect afresh (to whichever host now takes writes).
                        if let Some(c) = &client
                            && (c.is_closed() || c.simple_query("").await.is_err())
                        {
                            client = None;
                        }
                        if client.is_none() {
                            client = connect.client().await.ok();
                        }
                        answer(client.as_ref(), ask).await;
                    });
                }
            })
            .map_err(|e| StoreError::Backend(format!("audit reader thread: {e}")))?;
        Ok(Self { asks, location: Arc::new(PathBuf::from(location)) })
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(std::sync::mpsc::SyncSender<Result<T, StoreError>>) -> Ask,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.asks.send(make(tx)).map_err(|_| StoreError::Backend("the audit reader stopped".into()))?;
        rx.recv().map_err(|_| StoreError::Backend("the audit reader stopped".into()))?
    }

    fn page(&self, from: u64) -> Result<Vec<Row>, StoreError> {
        self.ask(|reply| Ask::Entries { from, limit: PAGE, reply })
    }

    /// Every signed checkpoint kept, oldest first (JSON).
    pub fn checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.ask(|reply| Ask::Checkpoints { reply })
    }

    /// Removes entries `..=last` and checkpoints before `last`, and keeps `base` in their place,
    /// in one transaction (see `audit::archive_base`).
    pub fn remove_archived(&self, last: u64, base: &[u8], from: u64) -> Result<(), StoreError> {
        self.ask(|reply| Ask::RemoveUpto { last, base: base.to_vec(), from, reply })
    }

    /// The base the last archival kept.
    pub fn archive_base(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.ask(|reply| Ask::Base { reply })
    }

    /// Where an operator finds the chain (the database, named without its password).
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// The first entry's seq and the head row.
    pub fn ends(&self) -> Result<Ends, StoreError> {
        self.ask(|reply| Ask::Ends { reply })
    }
}

async fn answer(client: Option<&tokio_postgres::Client>, ask: Ask) {
    let down = || StoreError::Unavailable("cannot reach the database for the audit log".into());
    match ask {
        Ask::Entries { from, limit, reply } => {
            let rows = async {
                let c = client.ok_or_else(down)?;
                let from = i64::try_from(from).unwrap_or(i64::MAX);
                let rows = c
                    .query(
                        "SELECT seq, value, tag FROM audit_entries WHERE seq >= $1 ORDER BY seq LIMIT $2",
                        &[&from, &limit],
                    )
                    .await
                    .map_err(db)?;
                rows.iter().map(|r| Ok((i64_to_u64(r.get(0), "audit seq")?, r.get(1), r.get(2)))).collect()
            }
            .await;
            let _ = reply.send(rows);
        }
        Ask::Checkpoints { reply } => {
            let rows = async {
                let c = client.ok_or_else(down)?;
                let rows =
                    c.query("SELECT value FROM audit_checkpoints ORDER BY seq", &[]).await.map_err(db)?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            }
            .await;
            let _ = reply.send(rows);
        }
        Ask::Ends { reply } => {
            let ends = async {
                let c = client.ok_or_else(down)?;
                let first: Option<i64> =
                    c.query_one("SELECT min(seq) FROM audit_entries", &[]).await.map_err(db)?.get(0);
                let head =
                    c.query_one("SELECT seq, hash FROM audit_head WHERE id = 1", &[]).await.map_err(db)?;
                Ok((first.map(|f| i64_to_u64(f, "audit seq")).transpose()?, super::head_from(&head)?))
            }
            .await;
            let _ = reply.send(ends);
        }
        Ask::RemoveUpto { last, base, from, reply } => {
            let done = async {
                let c = client.ok_or_else(down)?;
                let last = i64::try_from(last).unwrap_or(i64::MAX);
                // One transaction: the base and the entries it stands for change places together.
                c.batch_execute("BEGIN").await.map_err(db)?;
                let removed = async {
                    // One archival at a time; one whose base was built before another node's
                    // archival moved the first entry is refused, and the newer base kept.
                    c.batch_execute("SELECT pg_advisory_xact_lock(7420000001)").await?;
                    let first: Option<i64> =
                        c.query_one("SELECT min(seq) FROM audit_entries", &[]).await?.get(0);
                    if first.and_then(|f| u64::try_from(f).ok()) != Some(from) {
                        return Ok(false);
                    }
                    c.execute("DELETE FROM audit_entries WHERE seq <= $1", &[&last]).await?;
                    c.execute("DELETE FROM audit_checkpoints WHERE seq < $1", &[&last]).await?;
                    c.execute(
                        "INSERT INTO meta (key, value) VALUES ($1, $2)
                         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        &[&ARCHIVE_BASE_KEY, &base],
                    )
                    .await?;
                    c.batch_execute("COMMIT").await.map(|()| true)
                }
                .await;
                match removed {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        let _ = c.batch_execute("ROLLBACK").await;
                        Err(StoreError::NotSupported(
                            "another archival moved the log's first entry since this one's base was built: nothing was removed",
                        ))
                    }
                    Err(e) => {
                        let _ = c.batch_execute("ROLLBACK").await;
                        Err(db(e))
                    }
                }
            }
            .await;
            let _ = reply.send(done);
        }
        Ask::Base { reply } => {
            let base = async {
                let c = client.ok_or_else(down)?;
                let row = c
                    .query_opt("SELECT value FROM meta WHERE key = $1", &[&ARCHIVE_BASE_KEY])
                    .await
                    .map_err(db)?;
                Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
            }
            .await;
            let _ = reply.send(base);
        }
    }
}

/// Entries from `from` on, page by page.
pub struct Pages<'a> {
    reader: &'a Reader,
    next: u64,
    page: std::vec::IntoIter<Row>,
    done: bool,
}

impl Iterator for Pages<'_> {
    type Item = Result<Row, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(row) = self.page.next() {
            self.next = row.0 + 1;
            return Some(Ok(row));
        }
        if self.done {
            return None;
        }
        match self.reader.page(self.next) {
            Ok(rows) => {
                self.done = rows.len() < PAGE as usize;
                self.page = rows.into_iter();
                let row = self.page.next()?;
                self.next = row.0 + 1;
                Some(Ok(row))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl Reader {
    /// Entries from `from` on, oldest first, page by page: `(seq, hash ‖ JSON, head tag)`.
    pub fn pages(&self, from: u64) -> Pages<'_> {
        Pages { reader: self, next: from, page: Vec::new().into_iter(), done: false }
    }
}
