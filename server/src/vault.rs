//! The domain: every record operation runs the same path —
//! authenticate (done by the caller, see [`Vault::authenticate`]) → validate → decide → audit →
//! execute — and returns plain Rust types. No protobuf or tonic here.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use khlang_keys::{
    DataKey, DerivedKey, FieldContext, Kek, KeyError, KeyRing, OsRandom, Plaintext, RootKey, SealParams,
    WrappedDataKey, labels, open_field, seal_field, seal_root_key, unseal_root_key,
};
use zeroize::Zeroizing;

use crate::audit::{AuditEvent, AuditSink};
use crate::catalogue;
use crate::policy::{self, Decision, Operation};
use crate::store::{Durability, FlushStats, Store, StoredField, StoredRecord};
use crate::{StoreError, VaultError};

/// Associated-data name of the sealed subject id; cannot collide with a catalogue name.
const SUBJECT_CONTEXT: &str = "@subject";
/// Generation of a record's first data key (re-encryption increments it).
const FIRST_GENERATION: u32 = 1;
const MODE_ENCRYPTED: &str = "encrypted";
const MODE_BASELINE: &str = "plaintext-baseline";

/// Configured limits, enforced on every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest gRPC message accepted (enforced by the transport).
    pub max_message_bytes: usize,
    pub max_fields_per_record: usize,
    pub max_field_bytes: usize,
    pub max_subject_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1 << 20,
            max_fields_per_record: 64,
            max_field_bytes: 8 * 1024,
            max_subject_bytes: 256,
        }
    }
}

/// How field values are stored. `PlaintextBaseline` exists only so the benchmark can measure what
/// encryption costs on the same path; a data folder remembers its mode and refuses the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CipherMode {
    #[default]
    Encrypted,
    PlaintextBaseline,
}

impl CipherMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Encrypted => MODE_ENCRYPTED,
            Self::PlaintextBaseline => MODE_BASELINE,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct VaultOptions {
    pub limits: Limits,
    pub durability: Durability,
    pub mode: CipherMode,
}

/// Who is calling, established by authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: String,
}

/// One request's context: the authenticated identity and where the request came from.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub peer: Option<SocketAddr>,
    pub request_id: String,
}

/// A named field value as it enters or leaves the vault.
#[derive(Debug)]
pub struct FieldValue {
    pub name: String,
    pub value: Plaintext,
}

#[derive(Debug)]
pub struct RecordView {
    pub record_id: String,
    pub subject_id: Plaintext,
    pub fields: Vec<FieldValue>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSummary {
    pub record_id: String,
    pub field_names: Vec<String>,
}

/// Keys that exist only while the vault is unsealed.
pub(crate) struct Unsealed {
    ring: KeyRing,
    pub(crate) token_pepper: DerivedKey,
    subject_index: DerivedKey,
}

pub struct Vault {
    pub(crate) store: Store,
    keys: RwLock<Option<Arc<Unsealed>>>,
    pub(crate) rng: OsRandom,
    limits: Limits,
    mode: CipherMode,
    audit: Arc<dyn AuditSink>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("mode", &self.mode)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn integrity(record_id: &str, what: impl Into<String>) -> impl FnOnce(KeyError) -> VaultError {
    let record_id = record_id.to_owned();
    let what = what.into();
    move |_| VaultError::Integrity { record_id, what }
}

impl Vault {
    /// Creates a new vault in `dir`: a random root key sealed under `passphrase`, and KEK version 1.
    pub fn init(
        dir: &Path,
        passphrase: &[u8],
        params: SealParams,
        options: &VaultOptions,
    ) -> Result<(), VaultError> {
        let store = Self::open_store(dir, Durability::PerRequest)?;
        Self::init_store(&store, passphrase, params, options.mode)
    }

    fn open_store(dir: &Path, durability: Durability) -> Result<Store, VaultError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| VaultError::FailedPrecondition(format!("cannot create data folder: {e}")))?;
        Ok(Store::open(dir, durability)?)
    }

    fn init_store(
        store: &Store,
        passphrase: &[u8],
        params: SealParams,
        mode: CipherMode,
    ) -> Result<(), VaultError> {
        if store.sealed_root()?.is_some() {
            return Err(StoreError::AlreadyInitialised.into());
        }
        let rng = OsRandom::new();
        let root = RootKey::generate(&rng)?;
        let sealed = seal_root_key(&root, passphrase, params, &rng)?;
        let kek = Kek::generate(1, &rng)?;
        let wrapped = root.wrap_kek(&kek, &rng)?;
        store.initialise(&sealed, mode.as_str(), kek.version(), &wrapped)?;
        Ok(())
    }

    /// Opens an initialised vault and unseals it with `passphrase`.
    pub fn open(
        dir: &Path,
        passphrase: &[u8],
        options: &VaultOptions,
        audit: Arc<dyn AuditSink>,
    ) -> Result<Self, VaultError> {
        let store = Self::open_store(dir, options.durability)?;
        Self::open_store_unsealed(store, passphrase, options, audit)
    }

    /// Opens the vault in `dir`, creating it first if the folder holds none.
    pub fn open_or_init(
        dir: &Path,
        passphrase: &[u8],
        params: SealParams,
        options: &VaultOptions,
        audit: Arc<dyn AuditSink>,
    ) -> Result<Self, VaultError> {
        let store = Self::open_store(dir, options.durability)?;
        if store.sealed_root()?.is_none() {
            Self::init_store(&store, passphrase, params, options.mode)?;
        }
        Self::open_store_unsealed(store, passphrase, options, audit)
    }

    fn open_store_unsealed(
        store: Store,
        passphrase: &[u8],
        options: &VaultOptions,
        audit: Arc<dyn AuditSink>,
    ) -> Result<Self, VaultError> {
        let sealed = store.sealed_root()?.ok_or(StoreError::NotInitialised)?;
        let found = store.mode()?.unwrap_or_else(|| MODE_ENCRYPTED.to_owned());
        if found != options.mode.as_str() {
            return Err(StoreError::ModeMismatch { found, expected: options.mode.as_str().to_owned() }.into());
        }
        let vault = Self {
            store,
            keys: RwLock::new(None),
            rng: OsRandom::new(),
            limits: options.limits,
            mode: options.mode,
            audit,
        };
        vault.unseal(&sealed, passphrase)?;
        Ok(vault)
    }

    fn unseal(&self, sealed: &[u8], passphrase: &[u8]) -> Result<(), VaultError> {
        let root = unseal_root_key(sealed, passphrase)?;
        let mut ring = KeyRing::new();
        for (version, wrapped) in self.store.keks()? {
            let kek = root.unwrap_kek(&wrapped)?;
            if kek.version() != version {
                return Err(StoreError::Corrupt("kek version").into());
            }
            ring.insert(kek);
        }
        let unsealed = Unsealed {
            ring,
            token_pepper: root.derive(labels::TOKEN_PEPPER)?,
            subject_index: root.derive(labels::SUBJECT_INDEX)?,
        };
        let mut slot =
            self.keys.write().map_err(|_| VaultError::FailedPrecondition("key state poisoned".into()))?;
        *slot = Some(Arc::new(unsealed));
        Ok(())
    }

    pub(crate) fn unsealed(&self) -> Result<Arc<Unsealed>, VaultError> {
        self.keys
            .read()
            .map_err(|_| VaultError::FailedPrecondition("key state poisoned".into()))?
            .clone()
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn flush_stats(&self) -> &FlushStats {
        self.store.flush_stats()
    }

    /// Flushes everything to disk (shutdown).
    pub fn flush(&self) -> Result<(), VaultError> {
        Ok(self.store.flush_now()?)
    }

    // ---- validate -------------------------------------------------------------------------

    fn check_subject(&self, subject: &str) -> Result<(), VaultError> {
        if subject.trim().is_empty() {
            return Err(VaultError::InvalidArgument("subject_id is empty".into()));
        }
        if subject.len() > self.limits.max_subject_bytes {
            return Err(VaultError::LimitExceeded(format!(
                "subject_id is longer than {} bytes",
                self.limits.max_subject_bytes
            )));
        }
        if subject.chars().any(char::is_control) {
            return Err(VaultError::InvalidArgument("subject_id contains control characters".into()));
        }
        Ok(())
    }

    fn check_record_id(record_id: &str) -> Result<(), VaultError> {
        uuid::Uuid::parse_str(record_id)
            .map(|_| ())
            .map_err(|_| VaultError::InvalidArgument("record_id is not a record id (a UUID)".into()))
    }

    /// Validates field names and values; returns canonical values, sorted by name.
    fn check_fields(&self, fields: Vec<FieldValue>) -> Result<Vec<FieldValue>, VaultError> {
        if fields.len() > self.limits.max_fields_per_record {
            return Err(VaultError::LimitExceeded(format!(
                "{} fields given; a record holds at most {}",
                fields.len(),
                self.limits.max_fields_per_record
            )));
        }
        let mut out = Vec::with_capacity(fields.len());
        for field in fields {
            let spec = catalogue::spec_for(&field.name)?;
            if field.value.len() > self.limits.max_field_bytes {
                return Err(VaultError::LimitExceeded(format!(
                    "field '{}' is larger than {} bytes",
                    spec.name, self.limits.max_field_bytes
                )));
            }
            let text = std::str::from_utf8(field.value.expose_secret())
                .map_err(|_| VaultError::InvalidArgument(format!("field '{}' is not UTF-8", spec.name)))?;
            let canonical = Zeroizing::new(catalogue::validate(spec, text)?);
            out.push(FieldValue { name: spec.name.to_owned(), value: Plaintext::from_str_copy(&canonical) });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = out.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(VaultError::InvalidArgument(format!("field '{}' is given twice", w[0].name)));
        }
        Ok(out)
    }

    fn check_names(names: &[String]) -> Result<Vec<&'static str>, VaultError> {
        let mut out: Vec<&'static str> =
            names.iter().map(|n| catalogue::spec_for(n).map(|s| s.name)).collect::<Result<_, _>>()?;
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    // ---- decide + audit -------------------------------------------------------------------

    /// Decides, then audits the decision (allowed or denied). Returns only if both succeeded.
    fn decide_and_audit(
        &self,
        caller: &Caller,
        op: Operation,
        record_id: Option<&str>,
        fields: &[&str],
        purpose: Option<&str>,
    ) -> Result<Decision, VaultError> {
        let decided = policy::decide(&caller.identity, op, fields, purpose);
        let (decision, rule) = match &decided {
            Ok(d) => ("allow", d.rule),
            Err(_) => ("deny", "deny-by-default"),
        };
        self.audit
            .record(&AuditEvent {
                request_id: &caller.request_id,
                identity: &caller.identity.name,
                role: &caller.identity.role,
                peer: caller.peer,
                operation: op.as_str(),
                record_id,
                fields,
                purpose,
                decision,
                rule,
            })
            .map_err(|_| VaultError::AuditUnavailable)?;
        decided
    }

    // ---- execute --------------------------------------------------------------------------

    fn seal_value(
        &self,
        dek: Option<&DataKey>,
        record_id: &str,
        field: &str,
        value: &Plaintext,
    ) -> Result<Vec<u8>, VaultError> {
        match dek {
            Some(dek) => Ok(seal_field(
                dek,
                FieldContext { record_id: record_id.as_bytes(), field },
                value,
                &self.rng,
            )?),
            None => Ok(value.expose_secret().to_vec()),
        }
    }

    fn open_value(
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

    fn unwrap_dek(
        &self,
        keys: &Unsealed,
        record_id: &str,
        wrapped: &[u8],
    ) -> Result<Option<DataKey>, VaultError> {
        match self.mode {
            CipherMode::Encrypted => keys
                .ring
                .unwrap_data_key(&WrappedDataKey::from_bytes(wrapped.to_vec()), record_id.as_bytes())
                .map(Some)
                .map_err(integrity(record_id, "data key")),
            CipherMode::PlaintextBaseline => Ok(None),
        }
    }

    fn subject_index(keys: &Unsealed, subject: &str) -> [u8; 32] {
        keys.subject_index.mac(subject.as_bytes())
    }

    /// Stores a new record for `subject` and returns its id.
    pub async fn put(
        &self,
        caller: &Caller,
        subject: &str,
        fields: Vec<FieldValue>,
    ) -> Result<String, VaultError> {
        let keys = self.unsealed()?;
        self.check_subject(subject)?;
        if fields.is_empty() {
            return Err(VaultError::InvalidArgument("a record needs at least one field".into()));
        }
        let fields = self.check_fields(fields)?;
        let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
        let record_id = uuid::Uuid::new_v4().to_string();
        self.decide_and_audit(caller, Operation::Write, Some(&record_id), &names, None)?;

        let (dek, wrapped) = match self.mode {
            CipherMode::Encrypted => {
                let dek = DataKey::generate(FIRST_GENERATION, &self.rng)?;
                let wrapped = keys.ring.wrap_data_key(&dek, record_id.as_bytes(), &self.rng)?;
                (Some(dek), wrapped.as_bytes().to_vec())
            }
            CipherMode::PlaintextBaseline => (None, Vec::new()),
        };
        let mut stored = Vec::with_capacity(fields.len());
        for f in &fields {
            stored.push(StoredField {
                name: f.name.clone(),
                envelope: self.seal_value(dek.as_ref(), &record_id, &f.name, &f.value)?,
            });
        }
        let subject_env =
            self.seal_value(dek.as_ref(), &record_id, SUBJECT_CONTEXT, &Plaintext::from_str_copy(subject))?;
        let record =
            StoredRecord::new(wrapped, Self::subject_index(&keys, subject), subject_env, stored, now_ms());
        self.store.insert_record(&record_id, &record)?;
        self.store.durable().await?;
        Ok(record_id)
    }

    /// Reads a record's fields: all of them, or those named in `only` that the record holds.
    pub fn get(
        &self,
        caller: &Caller,
        record_id: &str,
        only: &[String],
        purpose: Option<&str>,
    ) -> Result<RecordView, VaultError> {
        let keys = self.unsealed()?;
        Self::check_record_id(record_id)?;
        let requested = Self::check_names(only)?;
        let (record, _) = self.store.get_record(record_id)?.ok_or(VaultError::NotFound("record"))?;
        let names: Vec<&str> = if requested.is_empty() {
            record.fields.iter().map(|f| f.name.as_str()).collect()
        } else {
            requested.iter().copied().filter(|n| record.fields.iter().any(|f| f.name == *n)).collect()
        };
        self.decide_and_audit(caller, Operation::Read, Some(record_id), &names, purpose)?;

        let dek = self.unwrap_dek(&keys, record_id, &record.wrapped_key)?;
        let mut fields = Vec::with_capacity(names.len());
        for f in record.fields.iter().filter(|f| names.contains(&f.name.as_str())) {
            fields.push(FieldValue {
                name: f.name.clone(),
                value: self.open_value(dek.as_ref(), record_id, &f.name, &f.envelope)?,
            });
        }
        let subject_id = self.open_value(dek.as_ref(), record_id, SUBJECT_CONTEXT, &record.subject)?;
        Ok(RecordView { record_id: record_id.to_owned(), subject_id, fields })
    }

    /// Sets and removes fields of a record; returns the field names it holds afterwards.
    pub async fn update(
        &self,
        caller: &Caller,
        record_id: &str,
        set: Vec<FieldValue>,
        remove: &[String],
    ) -> Result<Vec<String>, VaultError> {
        let keys = self.unsealed()?;
        Self::check_record_id(record_id)?;
        if set.is_empty() && remove.is_empty() {
            return Err(VaultError::InvalidArgument("an update sets or removes at least one field".into()));
        }
        let set = self.check_fields(set)?;
        let remove = Self::check_names(remove)?;
        if let Some(both) = set.iter().find(|f| remove.contains(&f.name.as_str())) {
            return Err(VaultError::InvalidArgument(format!(
                "field '{}' is both set and removed",
                both.name
            )));
        }
        if self.store.get_record(record_id)?.is_none() {
            return Err(VaultError::NotFound("record"));
        }
        let mut names: Vec<&str> =
            set.iter().map(|f| f.name.as_str()).chain(remove.iter().copied()).collect();
        names.sort_unstable();
        self.decide_and_audit(caller, Operation::Update, Some(record_id), &names, None)?;

        // Optimistic read-modify-write: encrypt under the key the record holds, then swap only if
        // nobody changed the record meanwhile; otherwise read again.
        let max = self.limits.max_fields_per_record;
        let names = loop {
            let (mut record, read_bytes) =
                self.store.get_record(record_id)?.ok_or(VaultError::NotFound("record"))?;
            let dek = self.unwrap_dek(&keys, record_id, &record.wrapped_key)?;
            record
                .fields
                .retain(|f| !remove.contains(&f.name.as_str()) && !set.iter().any(|s| s.name == f.name));
            for f in &set {
                let envelope = self.seal_value(dek.as_ref(), record_id, &f.name, &f.value)?;
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
            if self.store.replace_record(record_id, &read_bytes, &record)? {
                break record.field_names();
            }
        };
        self.store.durable().await?;
        Ok(names)
    }

    /// Destroys a record and its data key.
    pub async fn delete(&self, caller: &Caller, record_id: &str) -> Result<(), VaultError> {
        self.unsealed()?;
        Self::check_record_id(record_id)?;
        self.decide_and_audit(caller, Operation::Delete, Some(record_id), &[], None)?;
        if !self.store.delete_record(record_id)? {
            return Err(VaultError::NotFound("record"));
        }
        self.store.durable().await?;
        Ok(())
    }

    /// A subject's record ids and field names; never values.
    pub fn list(&self, caller: &Caller, subject: &str) -> Result<Vec<RecordSummary>, VaultError> {
        let keys = self.unsealed()?;
        self.check_subject(subject)?;
        self.decide_and_audit(caller, Operation::List, None, &[], None)?;
        let records = self.store.records_of_subject(&Self::subject_index(&keys, subject))?;
        Ok(records
            .into_iter()
            .map(|(record_id, r)| RecordSummary { record_id, field_names: r.field_names() })
            .collect())
    }
}
