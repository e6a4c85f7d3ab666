//! The domain: every operation runs the same path —
//! authenticate (the wire layer calls [`Vault::authenticate`]) → validate → decide (the regulations)
//! → audit → execute — and returns plain Rust types. No protobuf or tonic here.

mod administration;
mod audit_reads;
pub mod auth;
pub mod authority;
pub mod backup;
pub mod break_glass;
pub mod bulk;
pub mod cluster;
mod completeness;
pub mod custodian_pace;
pub mod identities;
mod kek_check;
pub mod keyops;
mod records;
mod subjects;
#[cfg(test)]
mod tests;
mod types;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use khlang_keys::{
    DataKey, DerivationKey, DerivedKey, FieldContext, Kek, KeyError, KeyRing, KeyShare, OsRandom, Plaintext,
    RootKey, SealParams, WrappedDataKey, labels, open_field, seal_fields, seal_root_key, seal_share,
    split_root_key,
};
use zeroize::Zeroizing;

use crate::audit::Rpc;
use crate::audit::{
    AuditEntry, AuditFilter, AuditLog, CheckpointPolicy, Committed, Decided, KeyVersions, clean,
};
use crate::policy::catalogue;
use crate::policy::regulations::{Regulations, Reveal};
use crate::policy::{self, Ask, ConsentState, Decision, Operation};
use crate::storage::{
    Changes, Custody, Durability, FlushStats, SledStore, Storage, StoredConsent, StoredField, StoredIdentity,
    StoredRecord,
};
use crate::vault::auth::IssuedToken;
use crate::vault::auth::{AuthGuard, AuthLimits};
use crate::{StoreError, VaultError};
use khlang_keys::audit_chain::ChainReport;

/// A request's preparation for [`Vault::audited`]: runs `body` with `e`, the request's
/// `&mut AuditEntry`, and hands the entry back with the result. (A plain async closure borrowing
/// the entry is not provably `Send`; the boxed future is, by its type.)
macro_rules! prepare {
    (|$e:ident| $body:block) => {
        |mut entry| {
            Box::pin(async move {
                let result: Result<_, VaultError> = async {
                    let $e = &mut entry;
                    $body
                }
                .await;
                (entry, result)
            })
        }
    };
    (|_| $body:block) => {
        |entry| Box::pin(async move { (entry, async { $body }.await) })
    };
}
pub(crate) use prepare;

pub use types::*;

/// What a request's preparation returns (see [`Vault::audited`]): the entry it filled in, and its
/// result with the changes to commit with that entry. Boxed so the future is `Send` by its type
/// (an async closure's future is not provably `Send` for every lifetime it borrows).
pub(crate) type Prepared<'s, T> = std::pin::Pin<
    Box<dyn std::future::Future<Output = (AuditEntry, Result<(T, Changes), VaultError>)> + Send + 's>,
>;

/// Associated-data name of the sealed subject id; cannot collide with a catalogue name.
pub(crate) const SUBJECT_CONTEXT: &str = "@subject";
/// Generation of a record's first data key (re-encryption increments it).
pub(crate) const FIRST_GENERATION: u32 = 1;
const MODE_ENCRYPTED: &str = "encrypted";
#[cfg(feature = "bench")]
const MODE_BASELINE: &str = "plaintext-baseline";

/// Keys that exist only while the vault is unsealed.
pub(crate) struct Unsealed {
    pub(crate) root: RootKey,
    /// Rotation adds a version and retirement removes one while requests use the others.
    pub(crate) ring: RwLock<KeyRing>,
    pub(crate) token_pepper: DerivedKey,
    subject_index: DerivedKey,
}

impl Unsealed {
    pub(crate) fn ring(&self) -> std::sync::RwLockReadGuard<'_, KeyRing> {
        self.ring.read().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Vault {
    /// Declared (so dropped) before the store: the log holds handles on the store's tree, and
    /// sled releases its folder lock only when the database itself is dropped last.
    pub(crate) audit: AuditLog,
    pub(crate) store: Arc<dyn Storage>,
    /// The same store without the authority checks (the unseal-time check reads through it).
    pub(crate) unchecked: Arc<dyn Storage>,
    /// What the last unseal-time authority check found.
    pub(crate) authority_found: std::sync::Mutex<authority::AuthorityCheck>,
    /// The newest stored regulations serial refused (and recorded as an alarm entry) by a follower.
    pub(crate) alarmed_regulations: tokio::sync::Mutex<u64>,
    keys: RwLock<Option<Arc<Unsealed>>>,
    /// Custodians' shares received while sealed, until there are enough.
    pub(crate) pending_shares: std::sync::Mutex<Vec<KeyShare>>,
    /// The rekey ceremony in progress (memory only: a restart or a seal abandons it).
    pub(crate) rekey: tokio::sync::Mutex<Option<crate::vault::keyops::rekey::Ceremony>>,
    /// Wakes the background key job (rotation, re-encryption).
    pub(crate) job_signal: Arc<tokio::sync::Notify>,
    pub(crate) job_meter: crate::vault::keyops::JobMeter,
    /// Requests seen (audited), so background jobs can tell an idle vault from a busy one.
    requests: std::sync::atomic::AtomicU64,
    /// Benchmark and test pacing of the background key job.
    pub(crate) job_pacing: crate::vault::keyops::JobPacing,
    seal_params: SealParams,
    pub(crate) identity_request_ttl: Duration,
    repeats: crate::audit::repeats::Repeats,
    pub(crate) rekey_ttl: Duration,
    regulations: RwLock<Arc<Regulations>>,
    /// The stored serial of the regulations in force.
    regulations_serial: std::sync::Mutex<u64>,
    regulations_path: Option<PathBuf>,
    /// `--regulations-changed`: reload the file once unsealed.
    reload_on_unseal: std::sync::atomic::AtomicBool,
    pub(crate) rng: OsRandom,
    pub(crate) auth_guard: AuthGuard,
    /// Wrong custodian tries, paced per address (never a lockout: see `custodian_pace`).
    pub(crate) custodian_pace: custodian_pace::CustodianPace,
    /// Records the log says exist that the store lost (its last records check): read, they answer
    /// `DataLoss` naming the loss instead of `NotFound`.
    pub(crate) lost_records: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Authority values already alarmed (one `AuthorityAlarm` entry each).
    pub(crate) alarmed: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Bounds concurrent passphrase derivations (Argon2id).
    pub(crate) derivations: crate::vault::auth::DerivationGate,
    limits: Limits,
    pub(crate) mode: CipherMode,
    bench_skip_policy: bool,
    /// `--accept-audit-break`, used at the first unseal.
    accept_audit_break: std::sync::Mutex<Option<u64>>,
    /// Dropped last, after the store: whoever waits on [`Vault::released`] learns the data
    /// folder's lock is free.
    released: std::sync::Mutex<Vec<std::sync::mpsc::Sender<()>>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("mode", &self.mode)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Characters that print as nothing (or reorder what follows): a look-alike subject id could hide
/// one.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{ad}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

pub(crate) use crate::clock::now_ms;

/// The catalogue's name for a record's subject id: personal data too, so a read returns it only
/// where a grant names it (data minimisation); never writable as a field.
pub const SUBJECT_FIELD: &str = "subject_id";

/// A value as the decision says to show it.
fn shown(regs: &Regulations, name: &str, how: Reveal, plain: Plaintext) -> Plaintext {
    match (how, regs.field(name)) {
        (Reveal::Masked, Some(rule)) => {
            let text = Zeroizing::new(String::from_utf8_lossy(plain.expose_secret()).into_owned());
            Plaintext::new(policy::mask(rule.mask, &text).into_bytes())
        }
        (Reveal::Masked, None) => Plaintext::from_str_copy("***"),
        (Reveal::Full, _) => plain,
    }
}

/// The subject index names a record whose sealed subject id is another person's.
fn foreign_record(record_id: &str) -> VaultError {
    VaultError::Integrity {
        record_id: record_id.to_owned(),
        what: "its owner (the subject index names it for another subject)".into(),
    }
}

fn integrity(record_id: &str, what: impl Into<String>) -> impl FnOnce(KeyError) -> VaultError {
    let record_id = record_id.to_owned();
    let what = what.into();
    move |_| VaultError::Integrity { record_id, what }
}

impl Vault {
    /// Creates a new vault in `dir`: a random root key sealed under `passphrase`, and KEK version 1.
    pub async fn init(
        dir: &Path,
        passphrase: &[u8],
        params: SealParams,
        options: &VaultOptions,
    ) -> Result<(), VaultError> {
        Self::init_custodians(dir, 1, &[passphrase], params, options).await.map(drop)
    }

    /// Creates a new vault whose root key is split among custodians, one passphrase each; any
    /// `threshold` of them unseal it (one custodian: the root key sealed whole). Returns it sealed.
    pub async fn init_custodians(
        dir: &Path,
        threshold: u8,
        passphrases: &[&[u8]],
        params: SealParams,
        options: &VaultOptions,
    ) -> Result<Self, VaultError> {
        let store = Self::open_store(dir, options).await?;
        Self::init_store(store.as_ref(), threshold, passphrases, params, options.mode).await?;
        Self::from_store(store, dir, options).await
    }

    /// The backend `options` name. The data folder is made 0700 whatever the umask (sled's
    /// database and the audit log's files live there).
    async fn open_store(dir: &Path, options: &VaultOptions) -> Result<Arc<dyn Storage>, VaultError> {
        Ok(match &options.storage {
            StorageLocation::Sled => Arc::new(SledStore::open(dir, options.durability)?),
            StorageLocation::Postgres { url, ca_cert } => {
                crate::storage::secure_folder(dir)?;
                Arc::new(crate::storage::PgStore::connect_with(url, ca_cert.as_deref()).await?)
            }
        })
    }

    /// Seals `root` for its custodians: whole under one passphrase, or as K-of-N shares.
    pub(crate) fn custody_for(
        root: &RootKey,
        threshold: u8,
        passphrases: &[&[u8]],
        params: SealParams,
        rng: &OsRandom,
    ) -> Result<Custody, VaultError> {
        if passphrases.iter().any(|p| p.is_empty()) {
            return Err(VaultError::InvalidArgument("a custodian's passphrase is empty".into()));
        }
        // The rule ChangePassphrase enforces holds from the start, and no two custodians share a
        // passphrase (that would be one person's knowledge twice, not split knowledge).
        for p in passphrases {
            crate::vault::keyops::check_new_passphrase(p)?;
        }
        if passphrases.iter().enumerate().any(|(i, p)| passphrases[..i].contains(p)) {
            return Err(VaultError::InvalidArgument("two custodians were given the same passphrase".into()));
        }
        match passphrases {
            [] => Err(VaultError::InvalidArgument("at least one custodian is needed".into())),
            [one] if threshold <= 1 => {
                Ok(Custody::Single { sealed_root: seal_root_key(root, one, params, rng)? })
            }
            many => {
                let count = u8::try_from(many.len())
                    .map_err(|_| VaultError::InvalidArgument("too many custodians".into()))?;
                let shares = split_root_key(root, threshold, count, rng)
                    .map_err(|e| VaultError::InvalidArgument(e.to_string()))?;
                let sealed = shares
                    .iter()
                    .zip(many)
                    .map(|(share, pass)| seal_share(share, pass, params, rng))
                    .collect::<Result<_, _>>()?;
                Ok(Custody::Shares { threshold, sealed })
            }
        }
    }

    pub(crate) async fn init_store(
        store: &dyn Storage,
        threshold: u8,
        passphrases: &[&[u8]],
        params: SealParams,
        mode: CipherMode,
    ) -> Result<(), VaultError> {
        if store.is_initialised().await? {
            return Err(StoreError::AlreadyInitialised.into());
        }
        let rng = OsRandom::new();
        let root = RootKey::generate(&rng)?;
        let custody = Self::custody_for(&root, threshold, passphrases, params, &rng)?;
        let derivation = root.wrap_derivation_key(&DerivationKey::generate(&rng)?, &rng)?;
        let kek = Kek::generate(1, &rng)?;
        let wrapped = root.wrap_kek(&kek, &rng)?;
        store.initialise(&custody, mode.as_str(), &derivation, (kek.version(), &wrapped), now_ms()).await?;
        Ok(())
    }

    /// Opens an initialised vault and unseals it with `passphrase` (a single-custodian vault, or
    /// custodian 1 of a 1-of-N one).
    pub async fn open(dir: &Path, passphrase: &[u8], options: &VaultOptions) -> Result<Self, VaultError> {
        Self::unsealed_with(Self::open_sealed(dir, options).await?, passphrase).await
    }

    async fn unsealed_with(vault: Self, passphrase: &[u8]) -> Result<Self, VaultError> {
        vault.unseal_with(1, passphrase, None, "", "").await?;
        vault.unsealed()?;
        Ok(vault)
    }

    /// Opens the vault in `dir`, creating it first if the folder holds none.
    pub async fn open_or_init(
        dir: &Path,
        passphrase: &[u8],
        params: SealParams,
        options: &VaultOptions,
    ) -> Result<Self, VaultError> {
        Self::unsealed_with(Self::open_or_init_sealed(dir, passphrase, params, options).await?, passphrase)
            .await
    }

    /// Opens the vault in `dir` sealed, creating it first (sealed under `passphrase`) if the
    /// folder holds none.
    pub async fn open_or_init_sealed(
        dir: &Path,
        passphrase: &[u8],
        params: SealParams,
        options: &VaultOptions,
    ) -> Result<Self, VaultError> {
        // One open of the store: sled releases its lock only after its own threads let go.
        let store = Self::open_store(dir, options).await?;
        if !store.is_initialised().await? {
            Self::init_store(store.as_ref(), 1, &[passphrase], params, options.mode).await?;
        }
        Self::from_store(store, dir, options).await
    }

    /// Opens an initialised vault without unsealing it: only status and unseal answer until
    /// enough custodians have given their passphrases ([`Vault::unseal_with`]).
    pub async fn open_sealed(dir: &Path, options: &VaultOptions) -> Result<Self, VaultError> {
        Self::from_store(Self::open_store(dir, options).await?, dir, options).await
    }

    /// Opens the vault `store` holds (sealed), its audit log's files in `dir`.
    pub async fn from_store(
        store: Arc<dyn Storage>,
        dir: &Path,
        options: &VaultOptions,
    ) -> Result<Self, VaultError> {
        if !store.is_initialised().await? {
            return Err(StoreError::NotInitialised.into());
        }
        let found = store.mode().await?.unwrap_or_else(|| MODE_ENCRYPTED.to_owned());
        if found != options.mode.as_str() {
            return Err(StoreError::ModeMismatch { found, expected: options.mode.as_str().to_owned() }.into());
        }
        let log_options = crate::audit::LogOptions {
            checkpoints: options.checkpoints,
            files: options.audit_files.clone(),
            disabled: options.skips_audit(),
            accept_unbased_log: options.accept_unbased_log,
        };
        let audit = AuditLog::open(store.as_ref(), dir, &log_options).await?;
        crate::storage::tighten(dir)?;
        let (regulations, regulations_serial, reload_on_unseal) =
            cluster::regulations_at_start(store.as_ref(), options).await?;
        let unchecked = store.clone();
        let store = authority::checked_store(store, audit.authority_key());
        let vault = Self {
            store,
            unchecked,
            authority_found: Default::default(),
            alarmed_regulations: Default::default(),
            keys: RwLock::new(None),
            pending_shares: std::sync::Mutex::new(Vec::new()),
            rekey: tokio::sync::Mutex::new(None),
            job_signal: Arc::default(),
            job_meter: Default::default(),
            requests: Default::default(),
            job_pacing: options.job_pacing,
            seal_params: options.seal_params,
            identity_request_ttl: options.identity_request_ttl,
            repeats: crate::audit::repeats::Repeats::new(options.audit_repeat_interval),
            rekey_ttl: options.rekey_ttl,
            regulations: RwLock::new(regulations),
            regulations_serial: std::sync::Mutex::new(regulations_serial),
            regulations_path: options.regulations_path.clone(),
            reload_on_unseal: std::sync::atomic::AtomicBool::new(reload_on_unseal),
            rng: OsRandom::new(),
            auth_guard: AuthGuard::new(options.auth),
            custodian_pace: custodian_pace::CustodianPace::new(&options.auth),
            lost_records: std::sync::Mutex::default(),
            alarmed: std::sync::Mutex::default(),
            derivations: Default::default(),
            limits: options.limits,
            mode: options.mode,
            bench_skip_policy: options.skips_policy(),
            accept_audit_break: std::sync::Mutex::new(options.accept_audit_break),
            released: Default::default(),
            audit,
        };
        let regs = vault.regulations();
        for warning in &regs.warnings {
            tracing::warn!(version = %regs.version, "regulations: {warning}");
        }
        Ok(vault)
    }

    /// Installs the keys `root` unlocks. Fails, changing nothing, if `root` is not this vault's
    /// root key (it must open every stored KEK).
    pub(crate) async fn install_root(&self, root: RootKey) -> Result<(), VaultError> {
        let mut ring = KeyRing::new();
        for (version, wrapped) in self.store.keks().await? {
            let kek = root.unwrap_kek(&wrapped).map_err(|_| VaultError::RootMismatch)?;
            if kek.version() != version {
                return Err(StoreError::Corrupt("kek version").into());
            }
            ring.insert(kek);
        }
        let derivation = match self.store.derivation_key().await? {
            Some(wrapped) => root.unwrap_derivation_key(&wrapped).map_err(|_| VaultError::RootMismatch)?,
            None => root.legacy_derivation_key()?,
        };
        self.audit
            .unlock(
                self.store.as_ref(),
                derivation.audit_signer()?,
                derivation.audit_tagger()?,
                derivation.audit_tagger()?,
            )
            .await?;
        let accept = self.accept_audit_break.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(entry) = accept {
            self.audit.accept_break(self.store.as_ref(), entry).await?;
        }
        self.install_authority(Arc::new(derivation.authority_tagger()?)).await?;
        let unsealed = Unsealed {
            ring: RwLock::new(ring),
            token_pepper: derivation.derive(labels::TOKEN_PEPPER)?,
            subject_index: derivation.derive(labels::SUBJECT_INDEX)?,
            root,
        };
        let mut slot =
            self.keys.write().map_err(|_| VaultError::FailedPrecondition("key state poisoned".into()))?;
        *slot = Some(Arc::new(unsealed));
        Ok(())
    }

    /// Wipes every key from memory (they drop, and zeroize, once in-flight requests finish).
    pub(crate) async fn drop_keys(&self) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.audit.authority_key().install(None);
        self.pending_shares.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.rekey.lock().await.take();
        self.audit.clear_signer();
    }

    pub(crate) fn requests_seen(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A subject's blind index, for tests that write the store as an attacker would.
    #[cfg(any(test, feature = "test-util"))]
    pub fn subject_index_for_tests(&self, subject: &str) -> Result<[u8; 32], VaultError> {
        Ok(Self::subject_index(&*self.unsealed()?, subject))
    }

    pub fn seal_params(&self) -> SealParams {
        self.seal_params
    }

    pub fn is_sealed(&self) -> bool {
        self.keys.read().map_or(true, |k| k.is_none())
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

    /// Signs the audit log's head and flushes everything to disk (shutdown).
    /// The last step of a daemon's life, after serving stopped and the key jobs with it: the
    /// final flush (repeat summaries, a signed checkpoint, the store), and the durability figures.
    pub async fn shut_down(&self) -> Result<(), VaultError> {
        let flushed = self.flush().await;
        let stats = self.flush_stats();
        tracing::info!(
            flushes = stats.flushes.load(std::sync::atomic::Ordering::Relaxed),
            durable_writes = stats.writes.load(std::sync::atomic::Ordering::Relaxed),
            "durability: writes acknowledged after a shared flush"
        );
        if let Some(chain) = self.store.shared_chain() {
            let s = chain.lock_stats();
            tracing::info!(
                lock_batches = s.batches,
                lock_requests = s.requests,
                lock_mean_us = s.mean_us,
                lock_p50_us = s.p50_us,
                lock_p99_us = s.p99_us,
                lock_max_us = s.max_us,
                "audit chain: how long this node's batches held the head lock"
            );
        }
        if let Err(e) = &flushed {
            tracing::error!(error = %e, "final flush failed");
        }
        flushed
    }

    pub async fn flush(&self) -> Result<(), VaultError> {
        self.write_repeats(true).await?;
        self.audit.checkpoint_now().await?;
        Ok(self.store.flush_now().await?)
    }

    pub fn regulations(&self) -> Arc<Regulations> {
        self.regulations.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn regulations_serial(&self) -> u64 {
        *self.regulations_serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After an unseal: the reload `--regulations-changed` asked for, audited as the operator's.
    pub(crate) async fn reload_if_asked(&self) {
        if !self.reload_on_unseal.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        match self.reload_regulations(None).await {
            Ok(info) => {
                tracing::info!(version = %info.version, "--regulations-changed: the new regulations are in force")
            }
            Err(e) => {
                tracing::error!(error = %e, "--regulations-changed: the file was refused; the regulations in force stay")
            }
        }
    }

    /// Swaps in `next`, stored as `serial`; serials only move forward, so a follower that read
    /// an older version late cannot undo a newer one.
    /// Puts `next` in force as `serial` whatever was in force (the unseal-time check replacing
    /// regulations read before they could be checked).
    pub(crate) fn force_regulations(&self, next: Regulations, serial: u64) {
        let mut slot = self.regulations.write().unwrap_or_else(|p| p.into_inner());
        let mut current = self.regulations_serial.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Arc::new(next);
        *current = serial;
    }

    pub(crate) fn install_regulations(&self, next: Regulations, serial: u64) -> bool {
        let mut slot = self.regulations.write().unwrap_or_else(|p| p.into_inner());
        let mut current = self.regulations_serial.lock().unwrap_or_else(|p| p.into_inner());
        if serial <= *current {
            return false;
        }
        *slot = Arc::new(next);
        *current = serial;
        true
    }

    // ---- decide + audit -------------------------------------------------------------------

    /// An audit entry for a request, filled in as the request proceeds.
    pub(crate) fn draft(&self, caller: &Caller, rpc: Rpc, op: Operation, regs: &Regulations) -> AuditEntry {
        AuditEntry {
            rpc: rpc.as_str().to_owned(),
            operation: op.as_str().to_owned(),
            identity: caller.identity.name.clone(),
            role: caller.identity.role.clone(),
            peer: caller.peer.map(|p| p.to_string()).unwrap_or_default(),
            request_id: clean(&caller.request_id),
            client_request_id: clean(&caller.client_request_id),
            decision: Decided::None,
            regulations_version: regs.version.clone(),
            ..AuditEntry::default()
        }
    }

    /// Decides under the regulations snapshot `regs`, recording the decision in `entry`.
    /// A denial becomes `PermissionDenied` with its reason.
    fn decide(
        &self,
        regs: &Regulations,
        caller: &Caller,
        ask: Ask<'_>,
        entry: &mut AuditEntry,
    ) -> Result<Decision, VaultError> {
        entry.fields = ask.fields.iter().map(|f| (*f).to_owned()).collect();
        entry.purpose = ask.purpose.unwrap_or_default().to_owned();
        if ask.op.touches_personal_data()
            && let crate::audit::LogState::Broken(b) = self.audit.state()
        {
            // Fail closed: no personal data moves while the record of who saw it is in doubt.
            entry.decision = Decided::Deny;
            entry.rule = "audit-log-broken".into();
            return Err(VaultError::FailedPrecondition(format!(
                "the audit log is damaged (entries {} to {} cannot be trusted); data requests are refused until the \
                 operator restarts the vault with --accept-audit-break {}",
                b.damaged_from, b.damaged_to, b.entry
            )));
        }
        let decided = if self.bench_skip_policy {
            Ok(Decision { rule: "bench-skip-policy".into(), reveal: vec![Reveal::Full; ask.fields.len()] })
        } else {
            policy::decide(regs, &caller.identity, ask)
        };
        match decided {
            Ok(d) => {
                entry.decision = Decided::Allow;
                entry.rule.clone_from(&d.rule);
                Ok(d)
            }
            Err(d) => {
                entry.decision = Decided::Deny;
                entry.rule = d.rule;
                Err(VaultError::PermissionDenied(d.reason))
            }
        }
    }

    /// Appends an entry with its changes now, and waits until both are durable.
    pub(crate) async fn commit_now(&self, entry: AuditEntry, changes: Changes) -> Result<(), VaultError> {
        match self.audit.commit(self.store.as_ref(), entry, changes).await? {
            Committed::Done(_) => {
                self.audit.sync_now()?;
                Ok(self.store.flush_now().await?)
            }
            Committed::Conflict => Err(VaultError::FailedPrecondition("concurrent change; try again".into())),
        }
    }

    /// Runs one request: `run` validates, decides and prepares (filling `entry`); its changes and the
    /// entry are committed together and flushed before the result is returned. If the entry cannot
    /// be written, the request fails and its result (plaintext included) is dropped. `run` is called
    /// again if a change it prepared conflicts with a concurrent one.
    pub(crate) async fn audited<'s, T>(
        &'s self,
        mut entry: AuditEntry,
        mut run: impl FnMut(AuditEntry) -> Prepared<'s, T>,
    ) -> Result<T, VaultError> {
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        // A request that may write tells the store's group commit it is on its way.
        let _writing =
            Operation::parse(&entry.operation).filter(|op| op.may_write()).map(|_| self.store.begin_write());
        loop {
            let (back, prepared) = run(entry).await;
            entry = back;
            let (result, changes) = match prepared {
                Ok((value, changes)) => (Ok(value), changes),
                Err(e) => (Err(e), Changes::none()),
            };
            let mut record = entry.clone();
            if record.subject.is_empty() && !record.record_id.is_empty() {
                // A request refused before it looked the record up still names the person whose
                // record it aimed at, so the per-subject report (PDPA access) finds it. The
                // answer does not change: the caller learns nothing.
                if let Ok(Some((stored, _))) = self.store.get_record(&record.record_id).await {
                    record.subject = hex::encode(stored.subject_index);
                }
            }
            match &result {
                Ok(_) => record.outcome = crate::Outcome::Ok,
                Err(e) => {
                    record.outcome = e.outcome();
                    if record.reason.is_empty() {
                        record.reason = clean(&e.to_string());
                    }
                }
            }
            let wrote = !changes.is_empty();
            let line = RequestLine::of(&record, || self.regulations());
            let seq = match self.audit.commit(self.store.as_ref(), record, changes).await? {
                Committed::Conflict => continue,
                Committed::Done(seq) => seq,
            };
            if wrote {
                // The entry travelled in the change's batch: sled's flush makes both durable.
                self.store.durable().await?;
                self.audit.stored_durably(seq);
            } else {
                self.audit.durable(seq).await?;
            }
            line.log(seq, started.elapsed());
            if let Err(e) = &result {
                // After this request's own write has gone its way (the alarm commits apart).
                drop(_writing);
                self.alarm_unauthentic(e).await;
            }
            return result;
        }
    }

    /// Writes an unauthenticated event unless it repeats one from its address within the
    /// interval (then it is counted into that kind's summary); writes the summaries that are due
    /// first. Returns the seq to wait for, if anything was written.
    async fn commit_repeatable(&self, entry: AuditEntry) -> Result<Option<u64>, VaultError> {
        let (admit, due) = self.repeats.admit(&entry, now_ms());
        let mut last = None;
        for summary in due {
            if let Committed::Done(seq) =
                self.audit.commit(self.store.as_ref(), summary, Changes::none()).await?
            {
                last = Some(seq);
            }
        }
        if let crate::audit::repeats::Admit::Write = admit
            && let Committed::Done(seq) =
                self.audit.commit(self.store.as_ref(), entry, Changes::none()).await?
        {
            last = Some(seq);
        }
        Ok(last)
    }

    /// [`Vault::commit_repeatable`], then durable (off the async runtime: it syncs).
    pub(crate) async fn commit_repeatable_now(&self, entry: AuditEntry) -> Result<(), VaultError> {
        if self.commit_repeatable(entry).await?.is_some() {
            self.audit.sync_now()?;
        }
        Ok(())
    }

    /// A custodian call's entry: refusals for load (busy, locked out, throttled) repeat by the
    /// thousand and are counted; every other outcome is written and synced.
    pub(crate) async fn commit_custodian(&self, entry: AuditEntry) -> Result<(), VaultError> {
        if entry.outcome == "ResourceExhausted" {
            self.commit_repeatable_now(entry).await
        } else {
            self.commit_now(entry, Changes::none()).await
        }
    }

    /// Whether repeated unauthenticated events are being counted (the watcher writes their
    /// summaries only then, off the runtime).
    pub(crate) fn repeats_counting(&self) -> bool {
        !self.repeats.is_empty()
    }

    /// Writes the summaries of repeated events whose interval ended (`all`: every one, at
    /// shutdown). Returns how many.
    pub async fn write_repeats(&self, all: bool) -> Result<usize, VaultError> {
        if self.repeats.is_empty() {
            return Ok(0);
        }
        let due = if all { self.repeats.all() } else { self.repeats.ended(now_ms()) };
        let n = due.len();
        for summary in due {
            self.audit.commit(self.store.as_ref(), summary, Changes::none()).await?;
        }
        if n > 0 {
            self.audit.sync_now()?;
        }
        Ok(n)
    }

    /// Records a request refused before it had an identity (failed authentication, lockout).
    pub async fn audit_refused(
        &self,
        rpc: Rpc,
        peer: Option<SocketAddr>,
        request_id: &str,
        client_request_id: &str,
        error: &VaultError,
    ) -> Result<(), VaultError> {
        let regs = self.regulations();
        let entry = AuditEntry {
            rpc: rpc.as_str().to_owned(),
            peer: peer.map(|p| p.to_string()).unwrap_or_default(),
            request_id: clean(request_id),
            client_request_id: clean(client_request_id),
            decision: Decided::None,
            reason: clean(&error.to_string()),
            regulations_version: regs.version.clone(),
            outcome: error.outcome(),
            ..AuditEntry::default()
        };
        if let Some(seq) = self.commit_repeatable(entry).await? {
            self.audit.durable(seq).await?;
        }
        self.alarm_unauthentic(error).await;
        Ok(())
    }
}

/// The server log's line for one request (target `khlang::request`, level info): what it was, who
/// asked, what was decided and how it ended, how long it took — never a value, a subject or a
/// record id (those are in the audit log, which is protected; the server log is not).
struct RequestLine {
    rpc: &'static str,
    identity: String,
    role: String,
    /// The purpose as a metrics label: one the regulations name, or `other`.
    purpose: String,
    decision: &'static str,
    status: &'static str,
    request_id: String,
}

impl RequestLine {
    fn of(entry: &AuditEntry, regs: impl FnOnce() -> Arc<Regulations>) -> Self {
        // Only the metrics label it (and they are off unless an exporter is installed).
        let purpose = match entry.purpose.as_str() {
            "" => String::new(),
            _ if !crate::metrics::enabled() => String::new(),
            p if regs().purposes.contains_key(p) => p.to_owned(),
            _ => "other".to_owned(),
        };
        Self {
            rpc: Rpc::static_name(&entry.rpc),
            identity: entry.identity.clone(),
            role: entry.role.clone(),
            purpose,
            decision: entry.decision.as_str(),
            status: entry.outcome.name(),
            request_id: entry.request_id.clone(),
        }
    }

    fn log(self, seq: u64, took: Duration) {
        crate::metrics::request(self.rpc, self.status, &self.role, &self.purpose, self.decision, took);
        tracing::info!(
            target: "khlang::request",
            rpc = %self.rpc,
            identity = %self.identity,
            role = %self.role,
            decision = self.decision,
            status = self.status,
            latency_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            request_id = %self.request_id,
            audit_seq = seq,
            "request"
        );
    }
}

/// What an archival moved out of the vault: entries `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveReport {
    pub first: u64,
    pub last: u64,
    pub entries: u64,
}

/// An entry for an action of the local operator (unseal, SIGHUP), which has no API identity.
pub(crate) fn operator_entry(rpc: Rpc, op: Operation, regs: &Regulations) -> AuditEntry {
    AuditEntry {
        rpc: rpc.as_str().to_owned(),
        operation: op.as_str().to_owned(),
        identity: "operator".into(),
        decision: Decided::None,
        regulations_version: regs.version.clone(),
        outcome: crate::Outcome::Ok,
        ..AuditEntry::default()
    }
}

/// The entry of a custodian's call: no token, so who it is is what the call says (`custodian-N`),
/// with the peer and both request ids.
pub(crate) fn custodian_entry(
    rpc: Rpc,
    identity: String,
    regs: &Regulations,
    peer: Option<SocketAddr>,
    request_id: &str,
    client_request_id: &str,
) -> AuditEntry {
    AuditEntry {
        identity,
        peer: peer.map(|p| p.to_string()).unwrap_or_default(),
        request_id: clean(request_id),
        client_request_id: clean(client_request_id),
        ..operator_entry(rpc, Operation::KeyAdmin, regs)
    }
}

// ---- the audit log, for security officers ---------------------------------------------------

/// Most heads a verification takes from a witness (one per 1,000 entries: a billion entries).
const MAX_WITNESSED: usize = 1_000_000;

pub use audit_reads::{AuditExport, AuditGrant};
