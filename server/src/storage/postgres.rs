//! Storage on PostgreSQL (15 and later), for several vault nodes sharing one database.
//!
//! One table per key space (`records`, `data_keys`, `identities`, `tokens`, `consent`, …, see
//! [`MIGRATIONS`]); rows hold the same encoded values as sled's (postcard), so only ciphertext,
//! wrapped keys, HMACs and blind indexes reach the database. A [`Changes`] is one transaction at
//! READ COMMITTED whose expectations take row locks before anything is written:
//! - the audit chain head is one row (`audit_head`), read `FOR UPDATE` first, so every commit that
//!   carries an entry is serialised on it across all nodes and the chain cannot fork;
//! - a record or data key expected unchanged is read `FOR UPDATE` and its revision compared (a
//!   revision comes from one sequence, so a deleted and re-created row never matches an old one);
//! - "this name is free" is an `INSERT … ON CONFLICT DO NOTHING` of a placeholder row: a concurrent
//!   creator waits on it and then finds the name taken;
//! - a KEK version expected live is read `FOR SHARE`, so retirement (a `DELETE`) waits for it.
//!
//! A deadlock or serialisation failure reruns the whole transaction (its expectations are read
//! again).
//!
//! Group commit: a change set commits with `synchronous_commit = off` — ordered, visible, its
//! locks released at once, but not yet waited for on disk — and [`Storage::durable`] (which a
//! request awaits before it is acknowledged) commits one tiny synchronous transaction (a "tick")
//! for every commit before it: PostgreSQL's WAL is one sequence, so the tick's flush (and, with
//! synchronous replication, its replica's confirmation) covers every earlier commit. Callers that
//! arrive while a tick runs share the next one. Everything else (custody, KEKs, lockouts)
//! commits synchronously.

#[path = "pg_commit.rs"]
mod commit;
use commit::*;
use std::str::FromStr;
use std::sync::Arc;

#[path = "pg_chain.rs"]
mod chain;
#[path = "pg_schema.rs"]
mod schema;
pub use chain::{Pages as ChainPages, Reader as ChainReader, Row as ChainRow};
pub use schema::PG_SCHEMA_VERSION;
use schema::migrate;

use deadpool_postgres::Transaction;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use conns::Conns;
use tokio::sync::mpsc;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::{
    AuditHead, AuditRecord, Changes, Cursor, Custody, Expect, FailureRecord, FlushStats, HeadRecorder,
    KekInfo, KeySpace, Op, Storage, Stored, StoredConsent, StoredIdentity, StoredIdentityRequest, StoredJob,
    StoredRecord, StoredRegulations, StoredToken, Version, Walked, decode_stored, encode_stored,
};
use crate::StoreError;

/// How often a node asks whether another changed credentials (the epoch every such change moves),
/// and for how long after its last answer its cache is trusted: a revocation on any node holds on
/// every other within `CREDENTIALS_POLL` plus a query, and a node that cannot ask stops trusting
/// its cache after `CREDENTIALS_TRUST` (every lookup goes to the database).
const CREDENTIALS_POLL: std::time::Duration = std::time::Duration::from_millis(200);
const CREDENTIALS_TRUST: std::time::Duration = std::time::Duration::from_millis(600);

/// Session advisory lock key ("khlajob" in ASCII) whose holder alone runs
/// the background key jobs. PostgreSQL drops it with the session, so when a node dies (or its
/// connection does) another node takes it at its next try.
const JOB_LEASE: i64 = 0x006b_686c_616a_6f62;

/// How many times a commit is rerun after a deadlock or serialisation failure before it fails.
const COMMIT_ATTEMPTS: usize = 8;

/// Connections each node keeps to the database.
const POOL_SIZE: usize = 16;

/// How long a connection attempt may take (unless the connection string says), and how long a
/// request waits for a free connection of the pool.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[path = "pg_conns.rs"]
mod conns;

const META_MODE: &str = "mode";
const META_DERIVATION_KEY: &str = "derivation_key";
const META_THRESHOLD: &str = "threshold";
/// Custodian 0 in `custody` is a root key sealed whole (one custodian).
const SINGLE_CUSTODIAN: i16 = 0;

fn locked_until(record: &FailureRecord) -> Result<Option<i64>, StoreError> {
    record.locked_until_ms.map(|t| u64_to_i64(t, "time")).transpose()
}

fn db(e: tokio_postgres::Error) -> StoreError {
    // The server's message (never its detail, which can quote a row's values) or the driver's;
    // neither names the connection's password.
    match e.as_db_error() {
        Some(d) if unavailable_state(d.code()) => {
            StoreError::Unavailable(format!("{} ({})", d.message(), d.code().code()))
        }
        Some(d) => StoreError::Backend(format!("{} ({})", d.message(), d.code().code())),
        None if lost_connection(&e) => StoreError::Unavailable(e.to_string()),
        None => StoreError::Backend(e.to_string()),
    }
}

/// States that say the server is going away, not ready, or read-only (a standby, or a primary
/// being demoted): the request may succeed once the database is back or has failed over.
fn unavailable_state(code: &SqlState) -> bool {
    let c = code.code();
    c.starts_with("08") || c.starts_with("57P") || *code == SqlState::READ_ONLY_SQL_TRANSACTION
}

/// A connection that could not be made, broke, or closed (no server message to go by).
fn lost_connection(e: &tokio_postgres::Error) -> bool {
    use std::error::Error;
    e.is_closed()
        || e.source().is_some_and(|s| s.is::<std::io::Error>())
        || e.to_string().starts_with("error connecting to server")
        || e.to_string().starts_with("timeout")
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        db(e)
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db(e),
        deadpool_postgres::PoolError::Timeout(_) | deadpool_postgres::PoolError::Closed => {
            StoreError::Unavailable(format!("connection pool: {e}"))
        }
        other => StoreError::Backend(format!("connection pool: {other}")),
    }
}

fn encode<T: Stored>(value: &T, what: &'static str) -> Result<Vec<u8>, StoreError> {
    encode_stored(value, what)
}

fn decode<T: Stored>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    decode_stored(bytes, what)
}

fn which_name(which: AuditRecord) -> &'static str {
    match which {
        AuditRecord::SignedHead => "signed_head",
        AuditRecord::ChangeTag => "change_tag",
        AuditRecord::ReadTag => "read_tag",
        AuditRecord::Break => "break",
    }
}

fn u64_to_i64(v: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(what))
}

fn i64_to_u64(v: i64, what: &'static str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(what))
}

/// The `audit_head` row (`seq, hash`; both NULL before any change carried an entry).
fn head_from(row: &tokio_postgres::Row) -> Result<Option<AuditHead>, StoreError> {
    let seq: Option<i64> = row.get(0);
    let hash: Option<Vec<u8>> = row.get(1);
    match (seq, hash) {
        (Some(seq), Some(hash)) => Ok(Some(AuditHead {
            seq: i64_to_u64(seq, "audit head")?,
            hash: hash.try_into().map_err(|_| StoreError::Corrupt("audit head"))?,
        })),
        _ => Ok(None),
    }
}

fn revision(rev: i64) -> Version {
    Version::new(rev.to_be_bytes().to_vec())
}

/// Whether a failed transaction may simply run again.
fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// TLS to the database, trusting only the CA in `path` (see [`crate::tls_client`]).
fn tls_connector(path: &std::path::Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let config =
        crate::tls_client::trusting(path, None).map_err(|e| StoreError::Backend(format!("database {e}")))?;
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A connection string with its password (if any) replaced, for messages and logs.
pub fn redacted(url: &str) -> String {
    match tokio_postgres::Config::from_str(url) {
        Ok(c) => {
            let hosts: Vec<String> = c
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    #[cfg(unix)]
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            format!(
                "postgres://{}@{}/{}",
                c.get_user().unwrap_or(""),
                hosts.join(","),
                c.get_dbname().unwrap_or("")
            )
        }
        Err(_) => "postgres://(unparsable)".to_owned(),
    }
}

/// The PostgreSQL store: a pool of connections to one database.
pub struct PgStore {
    pool: Conns,
    /// Connections whose sessions commit with `synchronous_commit = off`: change sets only (see
    /// the module's group commit).
    changes: Conns,
    /// Durable commits and the writes they covered: the ticks', and the shared chain's batches.
    stats: Arc<FlushStats>,
    /// Change sets committed (asynchronously) so far.
    commits: std::sync::atomic::AtomicU64,
    /// How many of them the last durability tick covered; held while a tick runs.
    covered: tokio::sync::Mutex<u64>,
    /// Head records written from the audit log's flusher thread, applied in order by one task.
    recorder: mpsc::UnboundedSender<(AuditRecord, Vec<u8>)>,
    /// Tokens and identities as last read or written, consulted by every request's
    /// authentication; emptied when any node moves the credentials epoch.
    credentials: Arc<std::sync::Mutex<Credentials>>,
    /// The audit chain every node on the database appends to.
    chain: Arc<chain::PgChain>,
    /// The session holding [`JOB_LEASE`] while this node runs the key jobs (taken out of the
    /// pool: the lock lives as long as the session, and ends with it if this node dies).
    job_lease: tokio::sync::Mutex<Option<deadpool_postgres::ClientWrapper>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to `url` (libpq style: `postgres://user@host1,host2/db?target_session_attrs=read-write`
    /// or `host=… dbname=…`), creates or upgrades the schema, and refuses a newer one. Must run
    /// inside a Tokio runtime (the pool and the head recorder live on it).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, None).await
    }

    /// Like [`PgStore::connect`]; with `ca_cert` (a PEM file), over TLS (rustls on ring) to a
    /// server whose certificate that CA signed, as the string's `sslmode` asks (`require`: TLS or
    /// no connection; `prefer`, the default: TLS when the server offers it).
    pub async fn connect_with(url: &str, ca_cert: Option<&std::path::Path>) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Backend(format!("connection string: {e}")))?;
        if config.get_connect_timeout().is_none() {
            // A host that does not answer (a partition, a dead primary's address) must not hold
            // requests for the kernel's minutes: the next host, or Unavailable, after this.
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let backoff = conns::Backoff::shared();
        let tls = match ca_cert {
            Some(path) => Some(tls_connector(path)?),
            None => None,
        };
        let pool_of = |config: tokio_postgres::Config| {
            let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
            let manager = match &tls {
                Some(tls) => Manager::from_config(config, tls.clone(), recycling),
                None => Manager::from_config(config, NoTls, recycling),
            };
            Pool::builder(manager)
                .max_size(POOL_SIZE)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(POOL_WAIT))
                .create_timeout(Some(CONNECT_TIMEOUT))
                .build()
                .map(|pool| Conns::new(pool, backoff.clone()))
                .map_err(|e| StoreError::Backend(format!("connection pool: {e}")))
        };
        let pool = pool_of(config.clone())?;
        let mut asynchronous = config.clone();
        asynchronous.options("-c synchronous_commit=off");
        let changes = pool_of(asynchronous)?;
        migrate(&pool).await?;
        let connect = match &tls {
            Some(tls) => chain::Connect::Tls(config.clone(), tls.clone()),
            None => chain::Connect::Plain(config.clone()),
        };
        let stats = Arc::new(FlushStats::default());
        let credentials = Arc::new(std::sync::Mutex::new(Credentials::default()));
        tokio::spawn(watch_credentials(pool.clone(), Arc::downgrade(&credentials)));
        let chain = Arc::new(chain::PgChain {
            pool: pool.clone(),
            credentials: credentials.clone(),
            reader: chain::Reader::start(connect, format!("{} (table audit_entries)", redacted(url)))?,
            held: Default::default(),
            stats: stats.clone(),
        });
        let (tx, mut rx) = mpsc::unbounded_channel::<(AuditRecord, Vec<u8>)>();
        let recording = pool.clone();
        tokio::spawn(async move {
            while let Some((which, value)) = rx.recv().await {
                if let Err(e) = set_record(&recording, which, &value).await {
                    tracing::warn!(error = %e, "could not record the audit log's head in the database");
                }
            }
        });
        Ok(Self {
            pool,
            changes,
            stats,
            commits: Default::default(),
            covered: tokio::sync::Mutex::new(0),
            recorder: tx,
            credentials,
            chain,
            job_lease: tokio::sync::Mutex::new(None),
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await
    }

    /// The schema version the database records (tests).
    #[cfg(any(test, feature = "test-util"))]
    pub async fn schema_version(&self) -> Result<i32, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(&c.prepare_cached("SELECT version FROM khlang_schema").await?, &[])
            .await
            .map_err(db)?;
        Ok(row.get(0))
    }

    /// Sets the recorded schema version (tests: a database "written by a newer build").
    #[cfg(any(test, feature = "test-util"))]
    pub async fn set_schema_version_for_tests(&self, version: i32) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(&c.prepare_cached("UPDATE khlang_schema SET version = $1").await?, &[&version])
            .await
            .map_err(db)?;
        Ok(())
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Credentials> {
        // A panic while holding it cannot leave it half-updated: every update is one map call.
        self.credentials.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn read_identity(&self, name: &str) -> Result<Option<StoredIdentity>, StoreError> {
        let c = self.client().await?;

        let row = c
            .query_opt(
                &c.prepare_cached("SELECT body FROM identities WHERE name = $1 AND body <> ''").await?,
                &[&name],
            )
            .await
            .map_err(db)?;
        row.map(|r| decode(&r.get::<_, Vec<u8>>(0), "identity")).transpose()
    }

    async fn list_identities_uncached(&self) -> Result<Vec<StoredIdentity>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &c.prepare_cached("SELECT body FROM identities WHERE body <> '' ORDER BY name").await?,
                &[],
            )
            .await
            .map_err(db)?;
        rows.iter().map(|r| decode(&r.get::<_, Vec<u8>>(0), "identity")).collect()
    }

    async fn identity_request(&self, id: &str) -> Result<Option<StoredIdentityRequest>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &c.prepare_cached("SELECT body FROM identity_requests WHERE id = $1 AND body <> ''").await?,
                &[&id],
            )
            .await
            .map_err(db)?;
        row.map(|r| decode(&r.get::<_, Vec<u8>>(0), "identity request")).transpose()
    }

    async fn identity_requests(&self) -> Result<Vec<StoredIdentityRequest>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &c.prepare_cached("SELECT body FROM identity_requests WHERE body <> '' ORDER BY id").await?,
                &[],
            )
            .await
            .map_err(db)?;
        rows.iter().map(|r| decode(&r.get::<_, Vec<u8>>(0), "identity request")).collect()
    }

    async fn read_token(&self, token_id: &str) -> Result<Option<StoredToken>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(&c.prepare_cached("SELECT body FROM tokens WHERE id = $1").await?, &[&token_id])
            .await
            .map_err(db)?;
        row.map(|r| decode(&r.get::<_, Vec<u8>>(0), "token")).transpose()
    }

    async fn tokens_of_uncached(&self, name: &str) -> Result<Vec<(String, StoredToken)>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &c.prepare_cached("SELECT id, body FROM tokens WHERE identity = $1 ORDER BY id").await?,
                &[&name],
            )
            .await
            .map_err(db)?;
        rows.iter().map(|r| Ok((r.get(0), decode(&r.get::<_, Vec<u8>>(1), "token")?))).collect()
    }

    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(&c.prepare_cached("SELECT value FROM meta WHERE key = $1").await?, &[&key])
            .await
            .map_err(db)?;
        Ok(row.map(|r| r.get(0)))
    }
}

/// Runs `$body` (which uses `$tx`, a transaction) and commits it; reruns it all after a deadlock
/// or serialisation failure. Evaluates to `Result<T, StoreError>`; a body that fails writes
/// nothing (custody, KEKs; change sets go through [`commit_once`]). A macro rather than a
/// function taking a closure: the body borrows the caller's arguments, which a boxed future
/// generic over the transaction's lifetime cannot.
macro_rules! in_transaction {
    ($pool:expr, |$tx:ident| $body:block) => {{
        async {
            let mut client = $pool.get().await?;
            let mut attempt = 0;
            loop {
                attempt += 1;
                let txn = client.transaction().await.map_err(db)?;
                let outcome: Result<_, TxError> = {
                    let $tx = &txn;
                    async { $body }.await
                };
                match outcome {
                    Ok(value) => match txn.commit().await {
                        Ok(()) => return Ok(value),
                        Err(e) if retryable(&e) && attempt < COMMIT_ATTEMPTS => continue,
                        Err(e) => return Err(db(e)),
                    },
                    Err(TxError::Db(e)) if retryable(&e) && attempt < COMMIT_ATTEMPTS => {
                        let _ = txn.rollback().await;
                        continue;
                    }
                    Err(TxError::Db(e)) => return Err(db(e)),
                    Err(TxError::Store(e)) => return Err(e),
                }
            }
        }
        .await
    }};
}

#[path = "pg_credentials.rs"]
mod credentials;
use credentials::Credentials;

/// Why a transaction body stopped: the database (maybe worth rerunning) or the store's own refusal.
enum TxError {
    Db(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Db(e)
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

/// Whether an operation changes what authentication reads (every node's cache must hear of it).
fn writes_credentials(op: &Op) -> bool {
    matches!(op, Op::PutToken { .. } | Op::RemoveToken(_) | Op::PutIdentity(_))
}

/// Moves the epoch every node's credentials cache watches, in the transaction of the change.
const BUMP_CREDENTIALS: &str = "UPDATE credentials_epoch SET n = n + 1 WHERE id = 1";

/// Empties the credentials cache whenever any node changed credentials (the epoch moved), and
/// keeps it trusted only while the database answers. Ends with the store.
async fn watch_credentials(pool: Conns, credentials: std::sync::Weak<std::sync::Mutex<Credentials>>) {
    let mut tick = tokio::time::interval(CREDENTIALS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let asked = std::time::Instant::now();
        let epoch = async {
            let c = pool.get().await?;
            let row = c
                .query_one(&c.prepare_cached("SELECT n FROM credentials_epoch WHERE id = 1").await?, &[])
                .await
                .map_err(db)?;
            Ok::<i64, StoreError>(row.get(0))
        }
        .await;
        let Some(credentials) = credentials.upgrade() else { return };
        let mut cache = credentials.lock().unwrap_or_else(|p| p.into_inner());
        match epoch {
            Ok(n) => {
                if cache.epoch != Some(n) {
                    cache.clear();
                    cache.epoch = Some(n);
                }
                // Trusted from when it asked: a change committed after that is heard next time.
                cache.trusted_until = Some(asked + CREDENTIALS_TRUST);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot hear the credentials epoch; authenticating from the database");
                cache.clear();
                cache.trusted_until = None;
            }
        }
    }
}

async fn set_record(pool: &Conns, which: AuditRecord, value: &[u8]) -> Result<(), StoreError> {
    let c = pool.get().await?;
    c.execute(
        &c.prepare_cached(
            "INSERT INTO audit_records (which, value) VALUES ($1, $2)
         ON CONFLICT (which) DO UPDATE SET value = EXCLUDED.value",
        )
        .await?,
        &[&which_name(which), &value],
    )
    .await
    .map_err(db)?;
    Ok(())
}

async fn write_custody(tx: &Transaction<'_>, custody: &Custody) -> Result<(), TxError> {
    tx.execute(&tx.prepare_cached("DELETE FROM custody").await?, &[]).await?;
    match custody {
        Custody::Single { sealed_root } => {
            tx.execute(
                &tx.prepare_cached("INSERT INTO custody VALUES ($1, $2)").await?,
                &[&SINGLE_CUSTODIAN, sealed_root],
            )
            .await?;
            tx.execute(&tx.prepare_cached("DELETE FROM meta WHERE key = $1").await?, &[&META_THRESHOLD])
                .await?;
        }
        Custody::Shares { threshold, sealed } => {
            for (i, share) in sealed.iter().enumerate() {
                let custodian = i16::try_from(i + 1).map_err(|_| StoreError::Corrupt("custodians"))?;
                tx.execute(
                    &tx.prepare_cached("INSERT INTO custody VALUES ($1, $2)").await?,
                    &[&custodian, share],
                )
                .await?;
            }
            put_meta(tx, META_THRESHOLD, &[*threshold]).await?;
        }
    }
    Ok(())
}

async fn put_meta(tx: &Transaction<'_>, key: &str, value: &[u8]) -> Result<(), TxError> {
    tx.execute(&tx.prepare_cached("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value").await?,
        &[&key, &value],
    )
    .await?;
    Ok(())
}

fn record_from(id: &str, body: &[u8], wrapped: Option<Vec<u8>>) -> Result<StoredRecord, StoreError> {
    let mut record = StoredRecord::decode(body)
        .map_err(|_| StoreError::Damaged { record_id: id.to_owned(), what: "record" })?;
    record.wrapped_key = wrapped.unwrap_or_default();
    Ok(record)
}

#[async_trait::async_trait]
impl Storage for PgStore {
    async fn mode(&self) -> Result<Option<String>, StoreError> {
        self.meta(META_MODE)
            .await?
            .map(|v| String::from_utf8(v).map_err(|_| StoreError::Corrupt("mode")))
            .transpose()
    }

    async fn initialise(
        &self,
        custody: &Custody,
        mode: &str,
        wrapped_derivation_key: &[u8],
        kek: (u32, &[u8]),
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let version = i32::try_from(kek.0).map_err(|_| StoreError::Corrupt("kek version"))?;
        let now = u64_to_i64(now_ms, "time")?;
        in_transaction!(self.pool, |tx| {
            // Two nodes initialising at once: the second waits here, then finds the first's.
            tx.execute(&tx.prepare_cached("LOCK TABLE custody IN EXCLUSIVE MODE").await?, &[]).await?;
            if tx.query_opt(&tx.prepare_cached("SELECT 1 FROM custody LIMIT 1").await?, &[]).await?.is_some()
            {
                return Err(StoreError::AlreadyInitialised.into());
            }
            write_custody(tx, custody).await?;
            put_meta(tx, META_DERIVATION_KEY, wrapped_derivation_key).await?;
            put_meta(tx, META_MODE, mode.as_bytes()).await?;
            tx.execute(&tx.prepare_cached("INSERT INTO keks VALUES ($1, $2)").await?, &[&version, &kek.1])
                .await?;
            tx.execute(
                &tx.prepare_cached("INSERT INTO kek_info VALUES ($1, $2, NULL)").await?,
                &[&version, &now],
            )
            .await?;
            Ok(())
        })
        .map(drop)
    }

    async fn is_initialised(&self) -> Result<bool, StoreError> {
        let c = self.client().await?;
        Ok(c.query_opt(&c.prepare_cached("SELECT 1 FROM custody LIMIT 1").await?, &[])
            .await
            .map_err(db)?
            .is_some())
    }

    async fn custody(&self) -> Result<Custody, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(&c.prepare_cached("SELECT custodian, sealed FROM custody ORDER BY custodian").await?, &[])
            .await
            .map_err(db)?;
        let rows: Vec<(i16, Vec<u8>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        match rows.as_slice() {
            [] => Err(StoreError::NotInitialised),
            [(SINGLE_CUSTODIAN, sealed)] => Ok(Custody::Single { sealed_root: sealed.clone() }),
            shares => {
                let threshold = self
                    .meta(META_THRESHOLD)
                    .await?
                    .and_then(|t| t.first().copied())
                    .ok_or(StoreError::Corrupt("custodians"))?;
                if shares.iter().enumerate().any(|(i, (c, _))| usize::try_from(*c) != Ok(i + 1)) {
                    return Err(StoreError::Corrupt("custodian share"));
                }
                Ok(Custody::Shares { threshold, sealed: shares.iter().map(|(_, s)| s.clone()).collect() })
            }
        }
    }

    async fn replace_sealed(&self, custodian: u8, sealed: &[u8]) -> Result<(), StoreError> {
        let slot = match self.custody().await? {
            Custody::Single { .. } => SINGLE_CUSTODIAN,
            Custody::Shares { .. } => i16::from(custodian),
        };
        let c = self.client().await?;
        let n = c
            .execute(
                &c.prepare_cached("UPDATE custody SET sealed = $2 WHERE custodian = $1").await?,
                &[&slot, &sealed],
            )
            .await
            .map_err(db)?;
        if n != 1 {
            return Err(StoreError::Corrupt("custodian share"));
        }
        Ok(())
    }

    async fn replace_root(
        &self,
        custody: &Custody,
        wrapped_derivation_key: &[u8],
        keks: &[(u32, Vec<u8>)],
    ) -> Result<(), StoreError> {
        in_transaction!(self.pool, |tx| {
            write_custody(tx, custody).await?;
            put_meta(tx, META_DERIVATION_KEY, wrapped_derivation_key).await?;
            for (version, wrapped) in keks {
                let v = i32::try_from(*version).map_err(|_| StoreError::Corrupt("kek version"))?;
                tx.execute(
                    &tx.prepare_cached("UPDATE keks SET wrapped = $2 WHERE version = $1").await?,
                    &[&v, wrapped],
                )
                .await?;
            }
            Ok(())
        })
        .map(drop)
    }

    async fn derivation_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.meta(META_DERIVATION_KEY).await
    }

    async fn add_kek(&self, version: u32, wrapped: &[u8], now_ms: u64) -> Result<(), StoreError> {
        let v = i32::try_from(version).map_err(|_| StoreError::Corrupt("kek version"))?;
        let now = u64_to_i64(now_ms, "time")?;
        in_transaction!(self.pool, |tx| {
            let used = tx
                .query_opt(&tx.prepare_cached("SELECT 1 FROM kek_info WHERE version = $1").await?, &[&v])
                .await?
                .is_some()
                || tx
                    .query_opt(&tx.prepare_cached("SELECT 1 FROM keks WHERE version = $1").await?, &[&v])
                    .await?
                    .is_some();
            if used {
                return Err(StoreError::Corrupt("kek version reused").into());
            }
            tx.execute(&tx.prepare_cached("INSERT INTO keks VALUES ($1, $2)").await?, &[&v, &wrapped])
                .await?;
            tx.execute(&tx.prepare_cached("INSERT INTO kek_info VALUES ($1, $2, NULL)").await?, &[&v, &now])
                .await?;
            Ok(())
        })
        .map(drop)
    }

    async fn retire_kek(&self, version: u32, now_ms: u64) -> Result<(), StoreError> {
        let v = i32::try_from(version).map_err(|_| StoreError::Corrupt("kek version"))?;
        let now = u64_to_i64(now_ms, "time")?;
        in_transaction!(self.pool, |tx| {
            // The row lock waits for every writer that expects this version live (they hold it
            // shared until they commit) and keeps new ones out; the count then sees every data
            // key any node wrapped under it, so none is left without its KEK.
            tx.execute(&tx.prepare_cached("SELECT 1 FROM keks WHERE version = $1 FOR UPDATE").await?, &[&v])
                .await?;
            let refs: i64 = tx
                .query_one(
                    &tx.prepare_cached(
                        "SELECT count(*) FROM data_keys WHERE substring(wrapped FROM 2 FOR 4) = int4send($1)",
                    )
                    .await?,
                    &[&v],
                )
                .await?
                .get(0);
            if refs > 0 {
                return Err(TxError::Store(StoreError::KekInUse { version, refs: i64_to_u64(refs, "count")? }));
            }
            tx.execute(&tx.prepare_cached("DELETE FROM keks WHERE version = $1").await?, &[&v]).await?;
            tx.execute(&tx.prepare_cached("INSERT INTO kek_info VALUES ($1, 0, $2) ON CONFLICT (version) DO UPDATE SET retired_ms = $2").await?,
                &[&v, &now],
            )
            .await?;
            Ok(())
        })
        .map(drop)
    }

    async fn kek_infos(&self) -> Result<Vec<KekInfo>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &c.prepare_cached("SELECT version, created_ms, retired_ms FROM kek_info ORDER BY version")
                    .await?,
                &[],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(KekInfo {
                    version: u32::try_from(r.get::<_, i32>(0))
                        .map_err(|_| StoreError::Corrupt("kek version"))?,
                    created_ms: i64_to_u64(r.get(1), "kek info")?,
                    retired_ms: r.get::<_, Option<i64>>(2).map(|t| i64_to_u64(t, "kek info")).transpose()?,
                })
            })
            .collect()
    }

    async fn keks(&self) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(&c.prepare_cached("SELECT version, wrapped FROM keks ORDER BY version").await?, &[])
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                let v = u32::try_from(r.get::<_, i32>(0)).map_err(|_| StoreError::Corrupt("kek version"))?;
                Ok((v, r.get(1)))
            })
            .collect()
    }

    /// The record and its data key in one statement: one snapshot, so they always belong together.
    async fn get_record(&self, record_id: &str) -> Result<Option<(StoredRecord, Version)>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &c.prepare_cached(
                    "SELECT r.body, r.rev, d.wrapped FROM records r LEFT JOIN data_keys d ON d.id = r.id
                 WHERE r.id = $1",
                )
                .await?,
                &[&record_id],
            )
            .await
            .map_err(db)?;
        row.map(|r| Ok((record_from(record_id, &r.get::<_, Vec<u8>>(0), r.get(2))?, revision(r.get(1)))))
            .transpose()
    }

    async fn records_of_subject(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<Vec<(String, StoredRecord)>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &c.prepare_cached(
                    "SELECT r.id, r.body, d.wrapped FROM records r LEFT JOIN data_keys d ON d.id = r.id
                 WHERE r.subject_index = $1 ORDER BY r.id",
                )
                .await?,
                &[&subject_index.as_slice()],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                let id: String = r.get(0);
                let record = record_from(&id, &r.get::<_, Vec<u8>>(1), r.get(2))?;
                Ok((id, record))
            })
            .collect()
    }

    async fn walk(&self, space: KeySpace, cursor: &Cursor, limit: usize) -> Result<Vec<Walked>, StoreError> {
        let after = std::str::from_utf8(cursor.as_bytes()).map_err(|_| StoreError::Corrupt("cursor"))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = match space {
            // A walked record's bytes are its encoding without the data key (which has its own
            // walk), as the memory store's are.
            KeySpace::Records => "SELECT id, body, rev FROM records WHERE id > $1 ORDER BY id LIMIT $2",
            KeySpace::DataKeys => "SELECT id, wrapped, rev FROM data_keys WHERE id > $1 ORDER BY id LIMIT $2",
        };
        let c = self.client().await?;
        let rows = c.query(&c.prepare_cached(sql).await?, &[&after, &limit]).await.map_err(db)?;
        rows.iter()
            .map(|r| {
                let id: String = r.get(0);
                let value: Vec<u8> = r.get(1);
                Ok(Walked {
                    cursor: Cursor::from_bytes(id.as_bytes().to_vec()),
                    record_id: id,
                    value,
                    version: revision(r.get(2)),
                })
            })
            .collect()
    }

    async fn count(&self, space: KeySpace) -> Result<u64, StoreError> {
        let sql = match space {
            KeySpace::Records => "SELECT count(*) FROM records",
            KeySpace::DataKeys => "SELECT count(*) FROM data_keys",
        };
        let c = self.client().await?;
        i64_to_u64(c.query_one(&c.prepare_cached(sql).await?, &[]).await.map_err(db)?.get(0), "count")
    }

    async fn get_identity(&self, name: &str) -> Result<Option<StoredIdentity>, StoreError> {
        let generation = {
            let cache = self.cache();
            if let Some(hit) = cache.identities.get(name).filter(|_| cache.trusted()) {
                return Ok(hit.clone());
            }
            cache.generation
        };
        let found = self.read_identity(name).await?;
        let mut cache = self.cache();
        if cache.generation == generation {
            Credentials::fill(&mut cache.identities, name, found.clone());
        }
        Ok(found)
    }

    async fn list_identities(&self) -> Result<Vec<StoredIdentity>, StoreError> {
        self.list_identities_uncached().await
    }

    async fn get_token(&self, token_id: &str) -> Result<Option<StoredToken>, StoreError> {
        let generation = {
            let cache = self.cache();
            if let Some(hit) = cache.tokens.get(token_id).filter(|_| cache.trusted()) {
                return Ok(hit.clone());
            }
            cache.generation
        };
        let found = self.read_token(token_id).await?;
        let mut cache = self.cache();
        if cache.generation == generation {
            Credentials::fill(&mut cache.tokens, token_id, found.clone());
        }
        Ok(found)
    }

    async fn get_identity_request(&self, id: &str) -> Result<Option<StoredIdentityRequest>, StoreError> {
        self.identity_request(id).await
    }

    async fn list_identity_requests(&self) -> Result<Vec<StoredIdentityRequest>, StoreError> {
        self.identity_requests().await
    }

    async fn tokens_of(&self, name: &str) -> Result<Vec<(String, StoredToken)>, StoreError> {
        self.tokens_of_uncached(name).await
    }

    async fn put_failures(&self, credential: &[u8], record: &FailureRecord) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            &c.prepare_cached(
                "INSERT INTO failures (credential, body, locked_until) VALUES ($1, $2, $3)
             ON CONFLICT (credential) DO UPDATE SET body = EXCLUDED.body, locked_until = EXCLUDED.locked_until",
            )
            .await?,
            &[&credential, &encode(record, "lockout record")?, &locked_until(record)?],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn count_failure(
        &self,
        credential: &[u8],
        update: &(dyn Fn(Option<FailureRecord>) -> FailureRecord + Sync),
    ) -> Result<Option<FailureRecord>, StoreError> {
        let empty = encode(&FailureRecord { format: 1, ..FailureRecord::default() }, "lockout record")?;
        in_transaction!(self.pool, |tx| {
            // A row to lock, so two nodes counting at once count twice, not once.
            tx.execute(
                &tx.prepare_cached(
                    "INSERT INTO failures (credential, body) VALUES ($1, $2) ON CONFLICT (credential) DO NOTHING",
                )
                .await?,
                &[&credential, &empty],
            )
            .await?;
            let row = tx
                .query_one(
                    &tx.prepare_cached("SELECT body FROM failures WHERE credential = $1 FOR UPDATE").await?,
                    &[&credential],
                )
                .await?;
            let stored: FailureRecord = decode(&row.get::<_, Vec<u8>>(0), "lockout record")?;
            let next = update(Some(stored));
            tx.execute(
                &tx.prepare_cached("UPDATE failures SET body = $2, locked_until = $3 WHERE credential = $1")
                    .await?,
                &[&credential, &encode(&next, "lockout record")?, &locked_until(&next)?],
            )
            .await?;
            Ok(Some(next))
        })
    }

    async fn lockouts(&self, now_ms: u64) -> Result<Vec<(Vec<u8>, FailureRecord)>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &c.prepare_cached("SELECT credential, body FROM failures WHERE locked_until > $1").await?,
                &[&u64_to_i64(now_ms, "time")?],
            )
            .await
            .map_err(db)?;
        rows.iter().map(|r| Ok((r.get(0), decode(&r.get::<_, Vec<u8>>(1), "lockout record")?))).collect()
    }

    async fn failure_records(&self) -> Result<Vec<(Vec<u8>, FailureRecord)>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(&c.prepare_cached("SELECT credential, body FROM failures").await?, &[])
            .await
            .map_err(db)?;
        rows.iter().map(|r| Ok((r.get(0), decode(&r.get::<_, Vec<u8>>(1), "lockout record")?))).collect()
    }

    async fn get_consent(
        &self,
        subject_index: &[u8; 32],
        purpose: &str,
    ) -> Result<Option<StoredConsent>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &c.prepare_cached("SELECT body FROM consent WHERE subject_index = $1 AND purpose = $2")
                    .await?,
                &[&subject_index.as_slice(), &purpose],
            )
            .await
            .map_err(db)?;
        row.map(|r| decode(&r.get::<_, Vec<u8>>(0), "consent")).transpose()
    }

    async fn all_consent(&self) -> Result<super::AllConsent, StoreError> {
        let c = self.client().await?;
        let index_of = |b: Vec<u8>| -> Result<[u8; 32], StoreError> {
            b.try_into().map_err(|_| StoreError::Corrupt("consent subject index"))
        };
        let current = c
            .query("SELECT subject_index, body FROM consent ORDER BY subject_index, purpose", &[])
            .await
            .map_err(db)?
            .into_iter()
            .map(|r| Ok((index_of(r.get(0))?, decode(&r.get::<_, Vec<u8>>(1), "consent")?)))
            .collect::<Result<_, StoreError>>()?;
        let history = c
            .query("SELECT subject_index, seq, body FROM consent_history ORDER BY subject_index, seq", &[])
            .await
            .map_err(db)?
            .into_iter()
            .map(|r| {
                let seq =
                    u64::try_from(r.get::<_, i64>(1)).map_err(|_| StoreError::Corrupt("consent seq"))?;
                Ok((index_of(r.get(0))?, seq, decode(&r.get::<_, Vec<u8>>(2), "consent")?))
            })
            .collect::<Result<_, StoreError>>()?;
        Ok((current, history))
    }

    async fn consent_of(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<(Vec<StoredConsent>, Vec<StoredConsent>), StoreError> {
        let c = self.client().await?;
        let current = c
            .query(
                &c.prepare_cached("SELECT body FROM consent WHERE subject_index = $1 ORDER BY purpose")
                    .await?,
                &[&subject_index.as_slice()],
            )
            .await
            .map_err(db)?;
        let history = c
            .query(
                &c.prepare_cached("SELECT body FROM consent_history WHERE subject_index = $1 ORDER BY seq")
                    .await?,
                &[&subject_index.as_slice()],
            )
            .await
            .map_err(db)?;
        let all = |rows: Vec<tokio_postgres::Row>| -> Result<Vec<StoredConsent>, StoreError> {
            rows.iter().map(|r| decode(&r.get::<_, Vec<u8>>(0), "consent")).collect()
        };
        Ok((all(current)?, all(history)?))
    }

    async fn job(&self) -> Result<Option<StoredJob>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(&c.prepare_cached("SELECT body FROM key_job WHERE id = 1").await?, &[])
            .await
            .map_err(db)?;
        row.map(|r| decode(&r.get::<_, Vec<u8>>(0), "key job")).transpose()
    }

    async fn regulations(&self) -> Result<Option<StoredRegulations>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &c.prepare_cached("SELECT body FROM regulations ORDER BY serial DESC LIMIT 1").await?,
                &[],
            )
            .await
            .map_err(db)?;
        row.map(|r| decode(&r.get::<_, Vec<u8>>(0), "regulations")).transpose()
    }

    async fn regulations_serial(&self) -> Result<Option<u64>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(&c.prepare_cached("SELECT max(serial) FROM regulations").await?, &[])
            .await
            .map_err(db)?;
        row.get::<_, Option<i64>>(0).map(|s| i64_to_u64(s, "regulations serial")).transpose()
    }

    async fn generate_id(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        i64_to_u64(
            c.query_one(&c.prepare_cached("SELECT nextval('ids')").await?, &[]).await.map_err(db)?.get(0),
            "id",
        )
    }

    async fn audit_record(&self, which: AuditRecord) -> Result<Option<Vec<u8>>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &c.prepare_cached("SELECT value FROM audit_records WHERE which = $1").await?,
                &[&which_name(which)],
            )
            .await
            .map_err(db)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn set_audit_record(&self, which: AuditRecord, value: &[u8]) -> Result<(), StoreError> {
        set_record(&self.pool, which, value).await
    }

    async fn remove_audit_record(&self, which: AuditRecord) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            &c.prepare_cached("DELETE FROM audit_records WHERE which = $1").await?,
            &[&which_name(which)],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    fn head_recorder(&self) -> HeadRecorder {
        let tx = self.recorder.clone();
        HeadRecorder::new(move |which, value| {
            tx.send((which, value.to_vec())).map_err(|_| StoreError::Flush("head recorder stopped".into()))
        })
    }

    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(&c.prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1").await?, &[])
            .await
            .map_err(db)?;
        head_from(&row)
    }

    async fn audit_entries_after(&self, after: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let c = self.client().await?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows = c
            .query(
                &c.prepare_cached("SELECT seq, value FROM audit_entries WHERE seq > $1 ORDER BY seq").await?,
                &[&after],
            )
            .await
            .map_err(db)?;
        rows.iter().map(|r| Ok((i64_to_u64(r.get(0), "audit seq")?, r.get(1)))).collect()
    }

    async fn remove_audit_entries_upto(&self, last: u64) -> Result<(), StoreError> {
        let c = self.client().await?;
        let last = i64::try_from(last).unwrap_or(i64::MAX);
        c.execute(&c.prepare_cached("DELETE FROM audit_entries WHERE seq <= $1").await?, &[&last])
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn commit(&self, changes: Changes) -> Result<bool, StoreError> {
        if changes.is_empty() {
            return Ok(true);
        }
        let (ops, mut expect) = changes.into_parts();
        expect.sort_by_key(lock_order);
        // Before and after: a read racing the commit sees the generation move and caches nothing.
        self.cache().invalidate(&ops);
        let mut all = Vec::new();
        for op in &ops {
            statements(op, &mut all)?;
        }
        if ops.iter().any(writes_credentials) {
            all.push(stmt(BUMP_CREDENTIALS, Vec::new()));
        }
        let mut attempt = 0;
        let done = loop {
            attempt += 1;
            let client = self.changes.get().await?;
            match commit_once(&client, &expect, &all).await {
                Ok(done) => break done,
                Err(TxError::Db(e)) if retryable(&e) && attempt < COMMIT_ATTEMPTS => continue,
                Err(TxError::Db(e)) => return Err(db(e)),
                Err(TxError::Store(e)) => return Err(e),
            }
        };
        self.cache().invalidate(&ops);
        if done {
            self.commits.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        Ok(done)
    }

    /// Waits until every change set committed before the call is on disk (see the module's
    /// group commit): one synchronous tick covers all of them.
    async fn durable(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let mine = self.commits.load(Ordering::Acquire);
        let mut covered = self.covered.lock().await;
        if *covered >= mine {
            return Ok(());
        }
        let target = self.commits.load(Ordering::Acquire);
        let c = self.client().await?;
        c.execute(&c.prepare_cached("UPDATE durability SET ticks = ticks + 1 WHERE id = 1").await?, &[])
            .await
            .map_err(db)?;
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.stats.writes.fetch_add(target - *covered, Ordering::Relaxed);
        *covered = target;
        Ok(())
    }

    async fn flush_now(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn flush_stats(&self) -> &FlushStats {
        &self.stats
    }

    fn shared_chain(&self) -> Option<Arc<dyn super::SharedChain>> {
        Some(self.chain.clone())
    }

    fn forget_cached(&self) {
        // The next lookup reads the database: the caller found a cached credential the access
        // log says is no longer current (another node changed it since this one cached it).
        self.cache().clear();
    }
    async fn hold_job_lease(&self, want: bool) -> Result<bool, StoreError> {
        let mut lease = self.job_lease.lock().await;
        if !want {
            if lease.take().is_some() {
                // Closing the session releases the lock.
                tracing::info!("gave up the key-job lease");
            }
            return Ok(false);
        }
        if let Some(session) = lease.as_ref() {
            match session.simple_query("SELECT 1").await {
                Ok(_) => return Ok(true),
                Err(e) => {
                    tracing::warn!(error = %db(e), "lost the key-job lease's session; another node may take the jobs");
                    *lease = None;
                }
            }
        }
        let c = self.pool.get().await?;
        let won: bool = c
            .query_one(&c.prepare_cached("SELECT pg_try_advisory_lock($1)").await?, &[&JOB_LEASE])
            .await
            .map_err(db)?
            .get(0);
        if won {
            tracing::info!("took the key-job lease: this node runs the background key jobs");
            *lease = Some(deadpool_postgres::Object::take(c));
        }
        Ok(won)
    }
}

#[cfg(test)]
#[path = "pg_tests.rs"]
mod tests;
