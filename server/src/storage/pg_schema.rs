//! The database's schema: created and upgraded in order, once, whichever node starts first.

use super::*;

/// The schema this build creates and upgrades to, one entry per version, applied in order inside
/// one transaction under [`MIGRATION_LOCK`]. A database whose `khlang_schema` names a higher
/// version was upgraded by a newer build and is refused.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE meta (key text PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE custody (custodian smallint PRIMARY KEY, sealed bytea NOT NULL);
     CREATE TABLE keks (version integer PRIMARY KEY, wrapped bytea NOT NULL);
     CREATE TABLE kek_info (version integer PRIMARY KEY, created_ms bigint NOT NULL, retired_ms bigint);
     CREATE SEQUENCE revisions;
     CREATE SEQUENCE ids;
     CREATE TABLE records (id text PRIMARY KEY, subject_index bytea NOT NULL, body bytea NOT NULL,
                           rev bigint NOT NULL);
     CREATE INDEX records_by_subject ON records (subject_index, id);
     CREATE TABLE data_keys (id text PRIMARY KEY, wrapped bytea NOT NULL, rev bigint NOT NULL);
     CREATE TABLE identities (name text PRIMARY KEY, body bytea NOT NULL);
     CREATE TABLE identity_requests (id text PRIMARY KEY, body bytea NOT NULL);
     CREATE TABLE tokens (id text PRIMARY KEY, identity text NOT NULL, body bytea NOT NULL);
     CREATE INDEX tokens_by_identity ON tokens (identity);
     CREATE TABLE failures (credential bytea PRIMARY KEY, body bytea NOT NULL);
     CREATE TABLE consent (subject_index bytea NOT NULL, purpose text NOT NULL, body bytea NOT NULL,
                           PRIMARY KEY (subject_index, purpose));
     CREATE TABLE consent_history (subject_index bytea NOT NULL, seq bigint NOT NULL, body bytea NOT NULL,
                                   PRIMARY KEY (subject_index, seq));
     CREATE TABLE key_job (id integer PRIMARY KEY CHECK (id = 1), body bytea NOT NULL);
     CREATE TABLE audit_records (which text PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE audit_head (id integer PRIMARY KEY CHECK (id = 1), seq bigint, hash bytea);
     INSERT INTO audit_head (id) VALUES (1);
     CREATE TABLE audit_entries (seq bigint PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE durability (id integer PRIMARY KEY CHECK (id = 1), ticks bigint NOT NULL);
     INSERT INTO durability VALUES (1, 0);",
    ),
    (
        2,
        // The audit chain lives here for every node: entries carry the tag of the batch they end,
        // checkpoints have their table, the head row names the newest signed checkpoint; and
        // every change to credentials moves an epoch the other nodes' caches watch.
        "ALTER TABLE audit_entries ADD COLUMN tag bytea;
         CREATE TABLE audit_checkpoints (seq bigint PRIMARY KEY, value bytea NOT NULL);
         ALTER TABLE audit_head ADD COLUMN signed_seq bigint NOT NULL DEFAULT 0,
                                ADD COLUMN signed_ms bigint NOT NULL DEFAULT 0;
         CREATE TABLE credentials_epoch (id integer PRIMARY KEY CHECK (id = 1), n bigint NOT NULL);
         INSERT INTO credentials_epoch VALUES (1, 0);",
    ),
    (
        3,
        // Every version of the regulations the nodes have been under, the newest in force.
        // And lockouts every node follows: the time a credential is locked until, indexed.
        "CREATE TABLE regulations (serial bigint PRIMARY KEY, body bytea NOT NULL);
         ALTER TABLE failures ADD COLUMN locked_until bigint;
         CREATE INDEX failures_locked ON failures (locked_until) WHERE locked_until IS NOT NULL;",
    ),
];

/// The newest schema version this build knows.
pub const PG_SCHEMA_VERSION: i32 = 3;

/// Advisory lock key (an arbitrary constant, "khlang" in ASCII) that serialises schema upgrades
/// when several nodes start at once.
const MIGRATION_LOCK: i64 = 0x6b68_6c61_6e67;

pub(super) async fn migrate(pool: &Conns) -> Result<(), StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await.map_err(db)?;
    tx.execute(&tx.prepare_cached("SELECT pg_advisory_xact_lock($1)").await?, &[&MIGRATION_LOCK])
        .await
        .map_err(db)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS khlang_schema (id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL);
         INSERT INTO khlang_schema VALUES (1, 0) ON CONFLICT (id) DO NOTHING;",
    )
    .await
    .map_err(db)?;
    let found: i32 = tx
        .query_one(&tx.prepare_cached("SELECT version FROM khlang_schema").await?, &[])
        .await
        .map_err(db)?
        .get(0);
    if found > PG_SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: u32::try_from(found).unwrap_or(u32::MAX),
            supported: PG_SCHEMA_VERSION as u32,
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.batch_execute(sql).await.map_err(db)?;
        tx.execute(&tx.prepare_cached("UPDATE khlang_schema SET version = $1").await?, &[version])
            .await
            .map_err(db)?;
        tracing::info!(from = found, to = version, "database schema upgraded");
    }
    tx.commit().await.map_err(db)
}
