//! What concerns a data subject as a whole: export (portability), erasure, consent.

use super::*;

impl Vault {
    /// Every record of a subject, every field in full (PDPA rights of access and portability).
    pub async fn export_subject(
        &self,
        caller: &Caller,
        subject: &str,
    ) -> Result<Vec<RecordView>, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::ExportSubject, Operation::Export, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                let (keys, index) = self.subject_op(regs, caller, Operation::Export, subject, e)?;
                let records = self.store.records_of_subject(&index).await?;
                let views = records
                    .iter()
                    .map(|(id, r)| {
                        let names: Vec<&str> = r.fields.iter().map(|f| f.name.as_str()).collect();
                        let view = self.open_record(&keys, regs, id, r, &names, &[], Some(Reveal::Full))?;
                        // The index is not authenticated; the sealed subject id is.
                        if view.subject_id.expose_secret() != subject.as_bytes() {
                            return Err(foreign_record(id));
                        }
                        Ok(view)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                e.reason = format!("{} records exported", views.len());
                Ok((views, Changes::none()))
            }),
        )
        .await
    }

    /// Destroys every record and data key of a subject (PDPA right to erasure); returns how many.
    pub async fn erase_subject(&self, caller: &Caller, subject: &str) -> Result<usize, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::EraseSubject, Operation::Erase, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                let (keys, index) = self.subject_op(regs, caller, Operation::Erase, subject, e)?;
                let mut changes = Changes::new();
                let mut n = 0;
                for (id, _) in self.store.records_of_subject(&index).await? {
                    if let Some((record, read)) = self.store.get_record(&id).await? {
                        // Never erase someone else's record because the (unauthenticated) index says so.
                        let dek = self.unwrap_dek(&keys, &id, &record.wrapped_key)?;
                        let owner = self.open_value(dek.as_ref(), &id, SUBJECT_CONTEXT, &record.subject)?;
                        if owner.expose_secret() != subject.as_bytes() {
                            return Err(foreign_record(&id));
                        }
                        changes.delete_record(&id, &record, read);
                        n += 1;
                    }
                }
                e.reason = format!("{n} records erased");
                Ok((n, changes))
            }),
        )
        .await
    }

    /// Records a subject's consent (`granted`) or opt-out for one purpose, with who recorded it.
    pub async fn set_consent(
        &self,
        caller: &Caller,
        subject: &str,
        purpose: &str,
        granted: bool,
    ) -> Result<StoredConsent, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::SetConsent, Operation::Consent, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                let keys = self.unsealed()?;
                e.purpose = clean(purpose);
                self.check_subject(subject)?;
                let index = Self::subject_index(&keys, subject);
                e.subject = hex::encode(index);
                let purpose = Self::check_purpose(regs, Some(purpose))?;
                let ask = Ask { op: Operation::Consent, fields: &[], purpose: Some(purpose), consent: None };
                self.decide(regs, caller, ask, e)?;
                e.reason = if granted { "consent granted".into() } else { "consent withdrawn".into() };
                let consent = StoredConsent {
                    format: 1,
                    purpose: purpose.to_owned(),
                    granted,
                    at_ms: now_ms(),
                    by: caller.identity.name.clone(),
                    auth: None,
                };
                let mut changes = Changes::new();
                changes.set_consent(&index, self.store.generate_id().await?, &consent);
                Ok((consent, changes))
            }),
        )
        .await
    }

    pub async fn consent(&self, caller: &Caller, subject: &str) -> Result<ConsentReport, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::GetConsent, Operation::Consent, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                let (_, index) = self.subject_op(regs, caller, Operation::Consent, subject, e)?;
                let (current, history) = self.store.consent_of(&index).await?;
                Ok((ConsentReport { current, history }, Changes::none()))
            }),
        )
        .await
    }
}
