//! Many records in one request (`PutRecords`, `khlang import`). Each record is put exactly as
//! `PutRecord` puts one — its own data key, its own `PutRecord` audit entry, the same checks —
//! and all of them are decided under the one regulations version in force when the request
//! arrived. They are stored concurrently, so the log's group commit takes them together: one
//! store batch and one flush for many records, instead of one of each per request.
//!
//! All or nothing: every record is checked (subject, fields, the decision) before any is stored;
//! if one is refused, none is stored, the refused ones answer their own error and the others
//! `Aborted`, each with its audit entry. The check is the put's own (`admit_put`), so a record
//! that passed it is refused afterwards only by the store or the log failing (the vault cannot
//! serve then): that is reported per record, and what was stored before is kept.

use futures_util::future::join_all;

use super::*;

/// One record of a batch.
#[derive(Debug)]
pub struct NewRecord {
    pub subject: String,
    pub fields: Vec<FieldValue>,
}

impl Vault {
    /// Puts every record of `records` (see the module doc); one result per record, in order.
    /// The batch as a whole is refused only when it is empty or over the batch limit.
    pub async fn put_many(
        &self,
        caller: &Caller,
        records: Vec<NewRecord>,
        all_or_nothing: bool,
    ) -> Result<Vec<Result<String, VaultError>>, VaultError> {
        if records.is_empty() {
            return Err(VaultError::InvalidArgument("a batch needs at least one record".into()));
        }
        let most = self.limits.max_batch_records;
        if records.len() > most {
            return Err(VaultError::LimitExceeded(format!(
                "{} records in one batch; at most {most} (send the rest in another)",
                records.len()
            )));
        }
        let regs = self.regulations();
        if all_or_nothing {
            let keys = self.unsealed()?;
            // Each record's check as its put would run it, recorded in an entry of its own.
            let checked: Vec<(AuditEntry, Option<VaultError>)> = records
                .iter()
                .map(|r| {
                    let mut entry = self.draft(caller, Rpc::PutRecord, Operation::Write, &regs);
                    let refused =
                        self.admit_put(&keys, &regs, caller, &r.subject, &r.fields, &mut entry).err();
                    (entry, refused)
                })
                .collect();
            if let Some(first) = checked.iter().position(|(_, refused)| refused.is_some()) {
                let answers = checked.into_iter().map(|(entry, why)| {
                    let why = why.unwrap_or_else(|| {
                        VaultError::Aborted(format!(
                            "not stored: record {first} of this all-or-nothing batch was refused"
                        ))
                    });
                    self.refuse_put(entry, why)
                });
                return Ok(join_all(answers).await);
            }
        }
        Ok(join_all(records.iter().map(|r| self.put_under(caller, &r.subject, &r.fields, &regs))).await)
    }

    /// Records a put that is not done, and why, in `entry` as its check left it (subject index,
    /// field names, the decision and its rule; never a value); answers `why`.
    async fn refuse_put(&self, entry: AuditEntry, why: VaultError) -> Result<String, VaultError> {
        // Refused before any change: `audited` runs the preparation once.
        let why = std::sync::Mutex::new(Some(why));
        let why = &why;
        self.audited(
            entry,
            prepare!(|e| {
                let _ = e;
                let why = why.lock().unwrap_or_else(|p| p.into_inner()).take();
                Err::<(String, Changes), _>(
                    why.unwrap_or_else(|| VaultError::Aborted("not stored (all-or-nothing batch)".into())),
                )
            }),
        )
        .await
    }
}
