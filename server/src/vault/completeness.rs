//! The store's records checked against the access log (see `audit::ledger`): on demand for a
//! security officer (`VerifyAudit`) and for the operator (`khlangd verify`). What it finds is an
//! alarm in the log itself, so the finding outlives whoever asked.

use super::{Vault, operator_entry};
use crate::VaultError;
use crate::audit::{Completeness, Rpc, clean};
use crate::policy::Operation;
use crate::storage::Changes;

impl Vault {
    /// Compares the store's records with the log's puts, deletes and erasures; records vanished
    /// or appeared outside the vault raise one `AuthorityAlarm` entry (DataLoss) naming the counts
    /// and the first record.
    pub async fn check_records(&self) -> Result<Completeness, VaultError> {
        self.unsealed()?;
        let found = self.audit.check_records(self.store.as_ref()).await?;
        *self.lost_records.lock().unwrap_or_else(|p| p.into_inner()) =
            found.vanished_ids.iter().cloned().collect();
        if !found.holds() {
            tracing::error!(
                vanished = found.vanished,
                appeared = found.appeared,
                "the store's records do not match the access log"
            );
            let mut entry = operator_entry(Rpc::AuthorityAlarm, Operation::AuditRead, &self.regulations());
            entry.identity = "vault".into();
            entry.outcome = crate::Outcome::DataLoss;
            entry.reason = clean(&format!(
                "records against the log: {} vanished without their delete entry, {} appeared without their put; first: {}",
                found.vanished,
                found.appeared,
                found.named.first().map_or("", String::as_str)
            ));
            self.commit_now(entry, Changes::none()).await?;
        }
        Ok(found)
    }

    /// What a read of a record the store does not hold answers: `DataLoss` naming it when the
    /// log says it exists (the store lost it), else `NotFound`.
    pub(crate) fn missing_record(&self, record_id: &str) -> VaultError {
        if self.lost_records.lock().unwrap_or_else(|p| p.into_inner()).contains(record_id) {
            return VaultError::Storage(crate::StoreError::Damaged {
                record_id: record_id.to_owned(),
                what: "record (lost: the access log put it and never deleted it)",
            });
        }
        VaultError::NotFound("record")
    }

    /// How many records the last check found lost (metrics).
    pub fn records_lost(&self) -> usize {
        self.lost_records.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
