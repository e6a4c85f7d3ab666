//! A change set's one transaction on PostgreSQL: its expectations as row locks and checks, its
//! operations as statements, committed in two round trips.

use super::*;

/// Whether one expectation holds, taking the row lock that keeps it holding until the commit.
pub(super) async fn holds<C: deadpool_postgres::GenericClient + Sync>(
    tx: &C,
    expect: &Expect,
) -> Result<bool, TxError> {
    Ok(match expect {
        Expect::AuditHead(head) => {
            let row = tx
                .query_one(
                    &tx.prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE").await?,
                    &[],
                )
                .await?;
            head_from(&row)? == *head
        }
        Expect::Record { id, version } => {
            let row = tx
                .query_opt(
                    &tx.prepare_cached("SELECT rev FROM records WHERE id = $1 FOR UPDATE").await?,
                    &[id],
                )
                .await?;
            row.is_some_and(|r| revision(r.get(0)) == *version)
        }
        Expect::DataKey { id, version } => {
            let row = tx
                .query_opt(
                    &tx.prepare_cached("SELECT rev FROM data_keys WHERE id = $1 FOR UPDATE").await?,
                    &[id],
                )
                .await?;
            row.is_some_and(|r| revision(r.get(0)) == *version)
        }
        Expect::DataKeyIs { id, wrapped } => {
            let row = tx
                .query_opt(
                    &tx.prepare_cached("SELECT wrapped FROM data_keys WHERE id = $1 FOR UPDATE").await?,
                    &[id],
                )
                .await?;
            row.is_some_and(|r| r.get::<_, Vec<u8>>(0) == *wrapped)
        }
        Expect::Identity { name, is: None } => {
            // Claims the name for this transaction; the operation that follows fills the row.
            tx.execute(
                &tx.prepare_cached(
                    "INSERT INTO identities (name, body) VALUES ($1, '') ON CONFLICT (name) DO NOTHING",
                )
                .await?,
                &[name],
            )
            .await?
                == 1
        }
        Expect::Identity { name, is: Some(expected) } => {
            let row = tx
                .query_opt(
                    &tx.prepare_cached("SELECT body FROM identities WHERE name = $1 FOR UPDATE").await?,
                    &[name],
                )
                .await?;
            match row {
                Some(r) => {
                    decode::<StoredIdentity>(&r.get::<_, Vec<u8>>(0), "identity").ok().as_ref()
                        == Some(expected)
                }
                None => false,
            }
        }
        Expect::IdentityRequest { id, is: None } => {
            tx.execute(
                &tx.prepare_cached(
                    "INSERT INTO identity_requests (id, body) VALUES ($1, '') ON CONFLICT (id) DO NOTHING",
                )
                .await?,
                &[id],
            )
            .await?
                == 1
        }
        Expect::IdentityRequest { id, is: Some(expected) } => {
            let row = tx
                .query_opt(
                    &tx.prepare_cached("SELECT body FROM identity_requests WHERE id = $1 FOR UPDATE").await?,
                    &[id],
                )
                .await?;
            match row {
                Some(r) => {
                    decode::<StoredIdentityRequest>(&r.get::<_, Vec<u8>>(0), "identity request").ok().as_ref()
                        == Some(expected)
                }
                None => false,
            }
        }
        Expect::KekLive(version) => {
            let v = i32::try_from(*version).map_err(|_| StoreError::Corrupt("kek version"))?;
            tx.query_opt(&tx.prepare_cached("SELECT 1 FROM keks WHERE version = $1 FOR SHARE").await?, &[&v])
                .await?
                .is_some()
        }
        Expect::Regulations(serial) => {
            // Writers of regulations commit under the chain head's lock, so the newest serial
            // read here stays the newest until this transaction ends.
            let row =
                tx.query_one(&tx.prepare_cached("SELECT max(serial) FROM regulations").await?, &[]).await?;
            row.get::<_, Option<i64>>(0).map(|s| i64_to_u64(s, "regulations serial")).transpose()? == *serial
        }
        Expect::Job(expected) => {
            let row = tx
                .query_opt(&tx.prepare_cached("SELECT body FROM key_job WHERE id = 1 FOR UPDATE").await?, &[])
                .await?;
            match (row, expected) {
                (Some(r), Some(expected)) => {
                    decode::<StoredJob>(&r.get::<_, Vec<u8>>(0), "key job").ok().as_ref() == Some(expected)
                }
                (None, None) => true,
                _ => false,
            }
        }
    })
}

/// The order expectations are checked in: the chain head first (every writer queues there before
/// it locks anything else, so writers cannot deadlock on each other's rows), then the rest.
pub(super) fn lock_order(e: &Expect) -> u8 {
    match e {
        Expect::AuditHead(_) => 0,
        Expect::KekLive(_) => 1,
        Expect::Identity { .. } | Expect::IdentityRequest { .. } => 2,
        Expect::Record { .. } => 3,
        Expect::DataKey { .. } | Expect::DataKeyIs { .. } => 4,
        Expect::Job(_) | Expect::Regulations(_) => 5,
    }
}

/// One statement of a change set's operations, with the values it binds.
pub(super) struct Statement {
    pub(crate) sql: &'static str,
    pub(crate) params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>,
}

pub(super) fn stmt(
    sql: &'static str,
    params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>,
) -> Statement {
    Statement { sql, params }
}

/// The statements an operation is applied by, in order. Each is one round trip's worth of work
/// that needs no answer of another, so a change set's statements can all be sent at once.
pub(super) fn statements(op: &Op, out: &mut Vec<Statement>) -> Result<(), StoreError> {
    match op {
        Op::InsertRecord { id, record } => {
            let mut body = record.clone();
            let wrapped = std::mem::take(&mut body.wrapped_key);
            out.push(stmt(
                "INSERT INTO records (id, subject_index, body, rev) VALUES ($1, $2, $3, nextval('revisions'))",
                vec![Box::new(id.clone()), Box::new(record.subject_index.to_vec()), Box::new(body.encode()?)],
            ));
            if !wrapped.is_empty() {
                out.push(stmt(
                    "INSERT INTO data_keys (id, wrapped, rev) VALUES ($1, $2, nextval('revisions'))",
                    vec![Box::new(id.clone()), Box::new(wrapped)],
                ));
            }
        }
        Op::ReplaceRecord { id, record } => {
            let mut body = record.clone();
            body.wrapped_key.clear();
            out.push(stmt(
                "UPDATE records SET body = $2, subject_index = $3, rev = nextval('revisions') WHERE id = $1",
                vec![Box::new(id.clone()), Box::new(body.encode()?), Box::new(record.subject_index.to_vec())],
            ));
        }
        Op::ReplaceDataKey { id, wrapped } => out.push(stmt(
            "INSERT INTO data_keys (id, wrapped, rev) VALUES ($1, $2, nextval('revisions'))
             ON CONFLICT (id) DO UPDATE SET wrapped = EXCLUDED.wrapped, rev = EXCLUDED.rev",
            vec![Box::new(id.clone()), Box::new(wrapped.clone())],
        )),
        Op::DeleteRecord { id, .. } => {
            out.push(stmt("DELETE FROM records WHERE id = $1", vec![Box::new(id.clone())]));
            out.push(stmt("DELETE FROM data_keys WHERE id = $1", vec![Box::new(id.clone())]));
        }
        Op::PutIdentity(identity) => out.push(stmt(
            "INSERT INTO identities (name, body) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body",
            vec![Box::new(identity.name.clone()), Box::new(encode(identity, "identity")?)],
        )),
        Op::PutIdentityRequest(request) => out.push(stmt(
            "INSERT INTO identity_requests (id, body) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
            vec![Box::new(request.id.clone()), Box::new(encode(request, "identity request")?)],
        )),
        Op::RemoveIdentityRequest(id) => {
            out.push(stmt("DELETE FROM identity_requests WHERE id = $1", vec![Box::new(id.clone())]))
        }
        Op::PutToken { id, token } => out.push(stmt(
            "INSERT INTO tokens (id, identity, body) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET identity = EXCLUDED.identity, body = EXCLUDED.body",
            vec![Box::new(id.clone()), Box::new(token.identity.clone()), Box::new(encode(token, "token")?)],
        )),
        Op::RemoveToken(id) => out.push(stmt("DELETE FROM tokens WHERE id = $1", vec![Box::new(id.clone())])),
        Op::SetConsent { subject_index, seq, consent } => {
            let body = encode(consent, "consent")?;
            out.push(stmt(
                "INSERT INTO consent (subject_index, purpose, body) VALUES ($1, $2, $3)
                 ON CONFLICT (subject_index, purpose) DO UPDATE SET body = EXCLUDED.body",
                vec![Box::new(subject_index.to_vec()), Box::new(consent.purpose.clone()), Box::new(body.clone())],
            ));
            out.push(stmt(
                "INSERT INTO consent_history (subject_index, seq, body) VALUES ($1, $2, $3)",
                vec![Box::new(subject_index.to_vec()), Box::new(u64_to_i64(*seq, "consent seq")?), Box::new(body)],
            ));
        }
        Op::PutRegulations(r) => out.push(stmt(
            "INSERT INTO regulations (serial, body) VALUES ($1, $2)",
            vec![Box::new(u64_to_i64(r.serial, "regulations serial")?), Box::new(encode(r, "regulations")?)],
        )),
        Op::RetagRegulations(r) => out.push(stmt(
            "UPDATE regulations SET body = $2 WHERE serial = $1",
            vec![Box::new(u64_to_i64(r.serial, "regulations serial")?), Box::new(encode(r, "regulations")?)],
        )),
        Op::RetagConsent { subject_index, seq: None, consent } => out.push(stmt(
            "UPDATE consent SET body = $3 WHERE subject_index = $1 AND purpose = $2",
            vec![
                Box::new(subject_index.to_vec()),
                Box::new(consent.purpose.clone()),
                Box::new(encode(consent, "consent")?),
            ],
        )),
        Op::RetagConsent { subject_index, seq: Some(seq), consent } => out.push(stmt(
            "UPDATE consent_history SET body = $3 WHERE subject_index = $1 AND seq = $2",
            vec![
                Box::new(subject_index.to_vec()),
                Box::new(u64_to_i64(*seq, "consent seq")?),
                Box::new(encode(consent, "consent")?),
            ],
        )),
        Op::PutJob(job) => out.push(stmt(
            "INSERT INTO key_job (id, body) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
            vec![Box::new(encode(job, "key job")?)],
        )),
        Op::AuditEntry { seq, value } => out.push(stmt(
            "INSERT INTO audit_entries (seq, value) VALUES ($1, $2)",
            vec![Box::new(u64_to_i64(*seq, "audit seq")?), Box::new(value.clone())],
        )),
        Op::AuditRecord { which, value } => out.push(stmt(
            "INSERT INTO audit_records (which, value) VALUES ($1, $2)
             ON CONFLICT (which) DO UPDATE SET value = EXCLUDED.value",
            vec![Box::new(which_name(*which)), Box::new(value.clone())],
        )),
        Op::AuditHead(head) => out.push(stmt(
            "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1",
            vec![Box::new(u64_to_i64(head.seq, "audit head")?), Box::new(head.hash.to_vec())],
        )),
    }
    Ok(())
}

/// One attempt at a change set, in two round trips: `BEGIN` with every expectation, then (if they
/// all hold) every statement with `COMMIT`. Each statement is prepared first (from the
/// connection's cache once warm), so each is sent on its future's first poll, in order, and
/// `COMMIT` after the last of them. A statement that fails aborts the transaction, and PostgreSQL
/// answers that `COMMIT` with a rollback: nothing of it is applied.
pub(super) async fn commit_once(
    c: &deadpool_postgres::Client,
    expect: &[Expect],
    statements: &[Statement],
) -> Result<bool, TxError> {
    use deadpool_postgres::GenericClient;
    use futures_util::future::{join, try_join_all};
    let prepared = try_join_all(statements.iter().map(|s| c.prepare_cached(s.sql))).await?;
    let (begun, held) =
        join(c.batch_execute("BEGIN"), try_join_all(expect.iter().map(|e| holds(c, e)))).await;
    begun?;
    let held = match held {
        Ok(held) => held,
        Err(e) => {
            c.batch_execute("ROLLBACK").await?;
            return Err(e);
        }
    };
    if !held.iter().all(|h| *h) {
        c.batch_execute("ROLLBACK").await?;
        return Ok(false);
    }
    let executes = try_join_all(statements.iter().zip(&prepared).map(|(s, p)| async move {
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            s.params.iter().map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        c.execute(p, &params).await
    }));
    let (applied, committed) = join(executes, c.batch_execute("COMMIT")).await;
    applied?;
    committed?;
    Ok(true)
}
