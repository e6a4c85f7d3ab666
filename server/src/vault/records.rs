//! The record operations: seal and open values, put, get, update, delete, list.

use super::*;

impl Vault {
    // ---- execute --------------------------------------------------------------------------

    pub(crate) fn seal_values(
        &self,
        dek: Option<&DataKey>,
        record_id: &str,
        values: &[(&str, &Plaintext)],
    ) -> Result<Vec<Vec<u8>>, VaultError> {
        match dek {
            Some(dek) => Ok(seal_fields(dek, record_id.as_bytes(), values, &self.rng)?),
            None => Ok(values.iter().map(|(_, v)| v.expose_secret().to_vec()).collect()),
        }
    }

    pub(crate) fn open_value(
        &self,
        dek: Option<&DataKey>,
        record_id: &str,
        field: &str,
        envelope: &[u8],
    ) -> Result<Plaintext, VaultError> {
        match dek {
            Some(dek) => open_field(dek, FieldContext { record_id: record_id.as_bytes(), field }, envelope)
                .map_err(integrity(
                    record_id,
                    if field == SUBJECT_CONTEXT { "subject id".into() } else { format!("field '{field}'") },
                )),
            None => Ok(Plaintext::new(envelope.to_vec())),
        }
    }

    pub(crate) fn unwrap_dek(
        &self,
        keys: &Unsealed,
        record_id: &str,
        wrapped: &[u8],
    ) -> Result<Option<DataKey>, VaultError> {
        match self.mode {
            CipherMode::Encrypted => {
                let ring = keys.ring();
                let wrapped = WrappedDataKey::from_bytes(wrapped.to_vec());
                match ring.unwrap_data_key(&wrapped, record_id.as_bytes()) {
                    Ok(dek) => Ok(Some(dek)),
                    // Another node rotated and this one has not loaded the new version yet (it
                    // follows the store within `cluster::FOLLOW_EVERY`): not damage, and nothing to return.
                    Err(KeyError::UnknownKekVersion(v)) if ring.active_version().is_some_and(|a| v > a) => {
                        Err(VaultError::Unavailable(format!(
                            "KEK v{v} is not loaded on this node yet; try again in a moment"
                        )))
                    }
                    Err(e) => Err(integrity(record_id, "data key")(e)),
                }
            }
            #[cfg(feature = "bench")]
            CipherMode::PlaintextBaseline => Ok(None),
        }
    }

    pub(crate) fn subject_index(keys: &Unsealed, subject: &str) -> [u8; 32] {
        keys.subject_index.mac(subject.as_bytes())
    }

    /// The KEK version and generation of a stored wrapped data key, for the audit entry (none
    /// for the benchmark's plaintext baseline, which has no key).
    pub(crate) fn key_versions(wrapped: &[u8]) -> KeyVersions {
        WrappedDataKey::from_bytes(wrapped.to_vec())
            .header()
            .map(|(kek, generation)| KeyVersions::data_key(kek, generation))
            .unwrap_or_default()
    }

    /// Opens the named fields of a record, applying `reveal` in order (full when absent), and its
    /// subject id as `subject` says (`None`: withheld, returned empty).
    #[allow(clippy::too_many_arguments)] // one read's whole context; a struct would only rename it
    pub(crate) fn open_record(
        &self,
        keys: &Unsealed,
        regs: &Regulations,
        record_id: &str,
        record: &StoredRecord,
        names: &[&str],
        reveal: &[Reveal],
        subject: Option<Reveal>,
    ) -> Result<RecordView, VaultError> {
        let dek = self.unwrap_dek(keys, record_id, &record.wrapped_key)?;
        let mut fields = Vec::with_capacity(names.len());
        for (name, how) in names.iter().zip(reveal.iter().chain(std::iter::repeat(&Reveal::Full))) {
            let Some(f) = record.fields.iter().find(|f| f.name == *name) else { continue };
            let plain = self.open_value(dek.as_ref(), record_id, &f.name, &f.envelope)?;
            fields.push(FieldValue { name: f.name.clone(), value: shown(regs, name, *how, plain) });
        }
        let subject_id = match subject {
            Some(how) => {
                let plain = self.open_value(dek.as_ref(), record_id, SUBJECT_CONTEXT, &record.subject)?;
                shown(regs, SUBJECT_FIELD, how, plain)
            }
            None => Plaintext::new(Vec::new()),
        };
        Ok(RecordView { record_id: record_id.to_owned(), subject_id, fields })
    }

    /// Stores a new record for `subject` and returns its id.
    pub async fn put(
        &self,
        caller: &Caller,
        subject: &str,
        fields: Vec<FieldValue>,
    ) -> Result<String, VaultError> {
        self.put_under(caller, subject, &fields, &self.regulations()).await
    }

    /// [`Vault::put`] decided under `regs` (a batch decides all its records under one version).
    pub(crate) async fn put_under(
        &self,
        caller: &Caller,
        subject: &str,
        fields: &[FieldValue],
        regs: &Arc<Regulations>,
    ) -> Result<String, VaultError> {
        let regs = regs.clone();
        let record_id = uuid::Uuid::new_v4().to_string();
        let entry = self.draft(caller, Rpc::PutRecord, Operation::Write, &regs);
        let (record_id, regs) = (&record_id, &regs);
        self.audited(
            entry,
            prepare!(|e| {
                let keys = self.unsealed()?;
                e.record_id.clone_from(record_id);
                let fields = self.admit_put(&keys, regs, caller, subject, fields, e)?;

                let mut changes = Changes::new();
                let (dek, wrapped) = match self.mode {
                    CipherMode::Encrypted => {
                        let dek = DataKey::generate(FIRST_GENERATION, &self.rng)?;
                        let wrapped = keys.ring().wrap_data_key(&dek, record_id.as_bytes(), &self.rng)?;
                        changes.expect_kek_live(wrapped.kek_version()?);
                        (Some(dek), wrapped.as_bytes().to_vec())
                    }
                    #[cfg(feature = "bench")]
                    CipherMode::PlaintextBaseline => (None, Vec::new()),
                };
                e.key_versions = Self::key_versions(&wrapped);
                let subject_plain = Plaintext::from_str_copy(subject);
                let mut to_seal: Vec<(&str, &Plaintext)> =
                    fields.iter().map(|f| (f.name.as_str(), &f.value)).collect();
                to_seal.push((SUBJECT_CONTEXT, &subject_plain));
                let mut envelopes = self.seal_values(dek.as_ref(), record_id, &to_seal)?;
                let subject_env = envelopes.pop().unwrap_or_default();
                let stored: Vec<StoredField> = fields
                    .iter()
                    .zip(envelopes)
                    .map(|(f, envelope)| StoredField { name: f.name.clone(), envelope })
                    .collect();
                let record = StoredRecord::new(
                    wrapped,
                    Self::subject_index(&keys, subject),
                    subject_env,
                    stored,
                    now_ms(),
                );
                changes.insert_record(record_id, &record);
                Ok((record_id.clone(), changes))
            }),
        )
        .await
    }

    /// What a put checks before anything is sealed (the subject, the fields, the decision),
    /// recorded in `e`; returns the canonical fields. An all-or-nothing batch runs it on every
    /// record before it stores any.
    pub(crate) fn admit_put(
        &self,
        keys: &Unsealed,
        regs: &Regulations,
        caller: &Caller,
        subject: &str,
        fields: &[FieldValue],
        e: &mut AuditEntry,
    ) -> Result<Vec<FieldValue>, VaultError> {
        self.check_subject(subject)?;
        e.subject = hex::encode(Self::subject_index(keys, subject));
        if fields.is_empty() {
            return Err(VaultError::InvalidArgument("a record needs at least one field".into()));
        }
        e.fields = fields.iter().map(|f| clean(&f.name)).collect();
        let fields = self.check_fields(regs, fields)?;
        let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
        let ask = Ask { op: Operation::Write, fields: &names, purpose: None, consent: None };
        self.decide(regs, caller, ask, e)?;
        Ok(fields)
    }

    /// Reads a record's fields for a stated purpose: those named in `only`, or every field it holds.
    /// Refused whole if any of them may not be read for that purpose.
    pub async fn get(
        &self,
        caller: &Caller,
        record_id: &str,
        only: &[String],
        purpose: Option<&str>,
    ) -> Result<RecordView, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::GetRecord, Operation::Read, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                let keys = self.unsealed()?;
                e.fields = only.iter().map(|f| clean(f)).collect();
                e.purpose = clean(purpose.unwrap_or_default());
                Self::check_record_id(record_id)?;
                e.record_id = record_id.to_owned();
                let requested = Self::check_names(regs, only)?;
                let purpose = Self::check_purpose(regs, purpose)?;
                // Decided before the record is looked up, on the fields as asked and the most consent
                // any subject could give: a caller who may not read them learns nothing of whether
                // the record exists or which fields it holds.
                let before = Ask {
                    op: Operation::Read,
                    fields: &requested,
                    purpose: Some(purpose),
                    consent: Some(ConsentState::Granted),
                };
                self.decide(regs, caller, before, e)?;
                let (record, _) =
                    self.store.get_record(record_id).await?.ok_or_else(|| self.missing_record(record_id))?;
                e.subject = hex::encode(record.subject_index);
                e.key_versions = Self::key_versions(&record.wrapped_key);
                // Asked fields the record does not hold are decided on too, and simply not returned.
                let names: Vec<&str> = if requested.is_empty() {
                    record.fields.iter().map(|f| f.name.as_str()).collect()
                } else {
                    requested
                };
                let consent = if policy::consults_consent(regs, purpose) {
                    Some(self.consent_state(&record.subject_index, purpose).await?)
                } else {
                    None
                };
                let ask = Ask { op: Operation::Read, fields: &names, purpose: Some(purpose), consent };
                let decision = self.decide(regs, caller, ask, e)?;
                // The subject id is shown only where a grant names it, as that grant says.
                let subject = if self.bench_skip_policy {
                    Some(Reveal::Full)
                } else {
                    let ask = Ask {
                        op: Operation::Read,
                        fields: &[SUBJECT_FIELD],
                        purpose: Some(purpose),
                        consent,
                    };
                    policy::decide(regs, &caller.identity, ask).ok().and_then(|d| d.reveal.first().copied())
                };
                if subject.is_some() && !e.fields.iter().any(|f| f == SUBJECT_FIELD) {
                    e.fields.push(SUBJECT_FIELD.into());
                }
                let view =
                    self.open_record(&keys, regs, record_id, &record, &names, &decision.reveal, subject)?;
                Ok((view, Changes::none()))
            }),
        )
        .await
    }

    pub(crate) async fn consent_state(
        &self,
        subject_index: &[u8; 32],
        purpose: &str,
    ) -> Result<ConsentState, VaultError> {
        Ok(match self.store.get_consent(subject_index, purpose).await? {
            Some(c) if c.granted => ConsentState::Granted,
            Some(_) => ConsentState::Withdrawn,
            None => ConsentState::Unknown,
        })
    }

    /// Sets and removes fields of a record; returns the field names it holds afterwards.
    pub async fn update(
        &self,
        caller: &Caller,
        record_id: &str,
        set: Vec<FieldValue>,
        remove: &[String],
    ) -> Result<Vec<String>, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::UpdateRecord, Operation::Update, &regs);
        let max = self.limits.max_fields_per_record;
        let (regs, set) = (&regs, &set);
        self.audited(
            entry,
            prepare!(|e| {
                let keys = self.unsealed()?;
                e.fields =
                    set.iter().map(|f| clean(&f.name)).chain(remove.iter().map(|r| clean(r))).collect();
                Self::check_record_id(record_id)?;
                e.record_id = record_id.to_owned();
                if set.is_empty() && remove.is_empty() {
                    return Err(VaultError::InvalidArgument(
                        "an update sets or removes at least one field".into(),
                    ));
                }
                let set = self.check_fields(regs, set)?;
                let remove = Self::check_names(regs, remove)?;
                if let Some(both) = set.iter().find(|f| remove.contains(&f.name.as_str())) {
                    return Err(VaultError::InvalidArgument(format!(
                        "field '{}' is both set and removed",
                        both.name
                    )));
                }
                // Decided before the record is looked up: no existence oracle for who may not update.
                let mut names: Vec<&str> =
                    set.iter().map(|f| f.name.as_str()).chain(remove.iter().copied()).collect();
                names.sort_unstable();
                let ask = Ask { op: Operation::Update, fields: &names, purpose: None, consent: None };
                self.decide(regs, caller, ask, e)?;
                let (mut record, read_bytes) =
                    self.store.get_record(record_id).await?.ok_or_else(|| self.missing_record(record_id))?;
                e.subject = hex::encode(record.subject_index);
                e.key_versions = Self::key_versions(&record.wrapped_key);

                // Encrypt under the key the record holds; the commit applies only if the record is
                // still exactly as read, otherwise this runs again.
                let dek = self.unwrap_dek(&keys, record_id, &record.wrapped_key)?;
                record
                    .fields
                    .retain(|f| !remove.contains(&f.name.as_str()) && !set.iter().any(|s| s.name == f.name));
                let to_seal: Vec<(&str, &Plaintext)> =
                    set.iter().map(|f| (f.name.as_str(), &f.value)).collect();
                let envelopes = self.seal_values(dek.as_ref(), record_id, &to_seal)?;
                for (f, envelope) in set.iter().zip(envelopes) {
                    record.fields.push(StoredField { name: f.name.clone(), envelope });
                }
                record.fields.sort_by(|a, b| a.name.cmp(&b.name));
                if record.fields.len() > max {
                    return Err(VaultError::LimitExceeded(format!("a record holds at most {max} fields")));
                }
                if record.fields.is_empty() {
                    return Err(VaultError::InvalidArgument(
                        "an update may not remove every field; delete the record instead".into(),
                    ));
                }
                record.updated_ms = now_ms();
                let mut changes = Changes::new();
                changes.replace_record(record_id, read_bytes, &record);
                Ok((record.field_names(), changes))
            }),
        )
        .await
    }

    /// Destroys a record and its data key.
    pub async fn delete(&self, caller: &Caller, record_id: &str) -> Result<(), VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::DeleteRecord, Operation::Delete, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                self.unsealed()?;
                Self::check_record_id(record_id)?;
                e.record_id = record_id.to_owned();
                let ask = Ask { op: Operation::Delete, fields: &[], purpose: None, consent: None };
                self.decide(regs, caller, ask, e)?;
                let (record, read) =
                    self.store.get_record(record_id).await?.ok_or_else(|| self.missing_record(record_id))?;
                e.subject = hex::encode(record.subject_index);
                e.key_versions = Self::key_versions(&record.wrapped_key);
                let mut changes = Changes::new();
                changes.delete_record(record_id, &record, read);
                Ok(((), changes))
            }),
        )
        .await
    }

    /// Decides an operation on a subject that involves no fields or purpose; fills the entry.
    pub(crate) fn subject_op(
        &self,
        regs: &Regulations,
        caller: &Caller,
        op: Operation,
        subject: &str,
        e: &mut AuditEntry,
    ) -> Result<(Arc<Unsealed>, [u8; 32]), VaultError> {
        let keys = self.unsealed()?;
        self.check_subject(subject)?;
        let index = Self::subject_index(&keys, subject);
        e.subject = hex::encode(index);
        self.decide(regs, caller, Ask { op, fields: &[], purpose: None, consent: None }, e)?;
        Ok((keys, index))
    }

    /// A subject's record ids and field names; never values.
    pub async fn list(&self, caller: &Caller, subject: &str) -> Result<Vec<RecordSummary>, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::ListRecords, Operation::List, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                let (_, index) = self.subject_op(regs, caller, Operation::List, subject, e)?;
                let records = self.store.records_of_subject(&index).await?;
                let out = records
                    .into_iter()
                    .map(|(record_id, r)| RecordSummary { record_id, field_names: r.field_names() })
                    .collect();
                Ok((out, Changes::none()))
            }),
        )
        .await
    }
}
