//! The domain: every operation runs the same path —
//! authenticate (the wire layer calls [`Vault::authenticate`]) → validate → decide (the regulations)
//! → audit → execute — and returns plain Rust types. No protobuf or tonic here.

pub mod auth;
pub mod authority;
pub mod backup;
pub mod cluster;
pub mod identities;
pub mod keyops;
#[cfg(test)]
mod tests;

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

/// How field values are stored. `PlaintextBaseline` exists only in `bench` builds, so the
/// benchmark can measure what encryption costs on the same path; a data folder remembers its mode
/// and refuses the other (a build without it refuses a baseline folder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CipherMode {
    #[default]
    Encrypted,
    #[cfg(feature = "bench")]
    PlaintextBaseline,
}

impl CipherMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Encrypted => MODE_ENCRYPTED,
            #[cfg(feature = "bench")]
            Self::PlaintextBaseline => MODE_BASELINE,
        }
    }
}

#[derive(Debug, Clone)]
pub struct VaultOptions {
    /// Where records, keys and identities live: sled in the data folder (the default), or a
    /// PostgreSQL database (the audit log's files stay in the data folder either way).
    pub storage: StorageLocation,
    pub limits: Limits,
    pub durability: Durability,
    pub mode: CipherMode,
    pub auth: AuthLimits,
    /// The regulations in force at start.
    pub regulations: Arc<Regulations>,
    /// Where reloads read the regulations from; `None` means the embedded sample, not reloadable.
    pub regulations_path: Option<PathBuf>,
    /// The file at `regulations_path` is meant to replace the regulations the vault holds
    /// (`--regulations-changed`): the vault starts under the ones it holds and, once unsealed,
    /// reloads the file (audited). Without it, a file that differs is refused.
    pub regulations_changed: bool,
    /// Benchmark baseline only (`bench` builds): allow every request without consulting the
    /// regulations.
    #[cfg(feature = "bench")]
    pub bench_skip_policy: bool,
    /// Benchmark baseline only (`bench` builds): write no audit entries (and do not flush for
    /// reads).
    #[cfg(feature = "bench")]
    pub bench_skip_audit: bool,
    pub checkpoints: CheckpointPolicy,
    /// The audit log's files: segment size, and the witness of its signed checkpoints.
    pub audit_files: crate::audit::files::FileOptions,
    /// The operator accepts the audit break carried forward at this entry (`--accept-audit-break`).
    pub accept_audit_break: Option<u64>,
    /// Pacing of background key jobs (tests slow them down to interrupt them).
    pub job_pacing: crate::vault::keyops::JobPacing,
    /// Argon2id cost for custodians' shares made by a rekey.
    pub seal_params: SealParams,
    /// How long a request to create a privileged identity waits for its approval.
    pub identity_request_ttl: Duration,
    /// The interval over which identical unauthenticated events from one address are counted
    /// into one summary entry instead of written one by one.
    pub audit_repeat_interval: Duration,
    /// How long a rekey ceremony may take before it is abandoned.
    pub rekey_ttl: Duration,
}

/// Which backend of the storage port a vault opens.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum StorageLocation {
    /// sled, in `<data folder>/db`.
    #[default]
    Sled,
    /// A PostgreSQL connection string (libpq style; several hosts and
    /// `target_session_attrs=read-write` allowed), and the CA certificate (PEM file) that signed
    /// the database server's: given, the connection uses TLS as `sslmode` says (`require`: TLS
    /// or nothing).
    Postgres { url: String, ca_cert: Option<PathBuf> },
}

impl std::fmt::Debug for StorageLocation {
    /// Never prints a password the connection string may carry.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sled => f.write_str("Sled"),
            Self::Postgres { url, .. } => write!(f, "Postgres({})", crate::storage::redacted(url)),
        }
    }
}

impl std::str::FromStr for StorageLocation {
    type Err = String;

    /// `sled` or a `postgres://` / `postgresql://` connection string.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "sled" {
            Ok(Self::Sled)
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(Self::Postgres { url: s.to_owned(), ca_cert: None })
        } else {
            Err("expected `sled` or a postgres:// connection string".into())
        }
    }
}

impl VaultOptions {
    /// Whether the decide step is skipped (a `bench` build's baseline; never otherwise).
    fn skips_policy(&self) -> bool {
        #[cfg(feature = "bench")]
        return self.bench_skip_policy;
        #[cfg(not(feature = "bench"))]
        false
    }

    /// Whether no audit entries are written (a `bench` build's baseline; never otherwise).
    fn skips_audit(&self) -> bool {
        #[cfg(feature = "bench")]
        return self.bench_skip_audit;
        #[cfg(not(feature = "bench"))]
        false
    }
}

impl Default for VaultOptions {
    fn default() -> Self {
        Self {
            storage: StorageLocation::Sled,
            limits: Limits::default(),
            durability: Durability::default(),
            mode: CipherMode::default(),
            auth: AuthLimits::default(),
            regulations: Arc::new(Regulations::sample()),
            regulations_path: None,
            regulations_changed: false,
            #[cfg(feature = "bench")]
            bench_skip_policy: false,
            #[cfg(feature = "bench")]
            bench_skip_audit: false,
            checkpoints: CheckpointPolicy::default(),
            audit_files: Default::default(),
            accept_audit_break: None,
            job_pacing: crate::vault::keyops::JobPacing::default(),
            seal_params: SealParams::DEFAULT,
            identity_request_ttl: crate::vault::identities::IDENTITY_REQUEST_TTL,
            audit_repeat_interval: crate::audit::repeats::REPEAT_INTERVAL,
            rekey_ttl: crate::vault::keyops::rekey::REKEY_TTL,
        }
    }
}

pub use crate::policy::Identity;

/// One request's context: the authenticated identity and where the request came from.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub peer: Option<SocketAddr>,
    /// The id the server gave this request (on the response and its audit entry).
    pub request_id: String,
    /// The caller's own `x-request-id`, if it sent one: recorded beside the server's, never instead.
    pub client_request_id: String,
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

/// A data subject's consent: current choice per purpose, and every change, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentReport {
    pub current: Vec<StoredConsent>,
    pub history: Vec<StoredConsent>,
}

/// An identity as listed to administrators: never a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    pub name: String,
    pub role: String,
    pub created_ms: u64,
    pub created_by: String,
    pub revoked_ms: Option<u64>,
}

/// What the regulations in force are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegulationsInfo {
    pub version: String,
    pub organisation: String,
    pub roles: Vec<String>,
    pub purposes: Vec<String>,
    pub fields: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSummary {
    pub record_id: String,
    pub field_names: Vec<String>,
}

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
        // Lockouts survive a restart: a custodian locked before it is locked after.
        let records = vault.store.failure_records().await?;
        vault.auth_guard.restore(
            records
                .into_iter()
                .filter_map(|(k, r)| Some((crate::vault::auth::Credential::from_key(&k)?, r)))
                .collect(),
        );
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

    // ---- validate -------------------------------------------------------------------------

    /// A subject id is compared byte for byte (its blind index is an HMAC of the bytes), so two
    /// spellings of one person would be two people, and an erasure of one would miss the other.
    /// The rule: no leading or trailing whitespace; no whitespace but single ASCII spaces; no
    /// control characters; no invisible formatting characters (zero-width, bidi controls, BOM,
    /// soft hyphen); no fullwidth forms of ASCII characters.
    pub(crate) fn check_subject(&self, subject: &str) -> Result<(), VaultError> {
        if subject.trim().is_empty() {
            return Err(VaultError::InvalidArgument("subject_id is empty".into()));
        }
        if subject.len() > self.limits.max_subject_bytes {
            return Err(VaultError::LimitExceeded(format!(
                "subject_id is longer than {} bytes",
                self.limits.max_subject_bytes
            )));
        }
        let refuse = |why: &str| Err(VaultError::InvalidArgument(format!("subject_id {why}")));
        if subject.chars().any(char::is_control) {
            return refuse("contains control characters");
        }
        if subject.trim() != subject {
            return refuse("starts or ends with whitespace");
        }
        if subject.contains("  ") || subject.chars().any(|c| c.is_whitespace() && c != ' ') {
            return refuse("holds whitespace other than single spaces");
        }
        if subject.chars().any(is_invisible) {
            return refuse("holds an invisible formatting character (zero-width, bidi control, BOM)");
        }
        if subject.chars().any(|c| ('\u{ff01}'..='\u{ff5e}').contains(&c)) {
            return refuse("holds fullwidth forms of ASCII characters; use the ASCII ones");
        }
        Ok(())
    }

    pub(crate) fn check_record_id(record_id: &str) -> Result<(), VaultError> {
        uuid::Uuid::parse_str(record_id)
            .map(|_| ())
            .map_err(|_| VaultError::InvalidArgument("record_id is not a record id (a UUID)".into()))
    }

    fn check_field_name<'r>(regs: &'r Regulations, name: &str) -> Result<&'r str, VaultError> {
        catalogue::check_field_name_allowed(name).map_err(VaultError::InvalidArgument)?;
        regs.fields.get_key_value(name).map(|(k, _)| k.as_str()).ok_or_else(|| {
            VaultError::InvalidArgument(format!(
                "unknown field '{}': not in the regulations' field catalogue",
                catalogue::printable(name)
            ))
        })
    }

    fn check_purpose<'r>(regs: &'r Regulations, purpose: Option<&str>) -> Result<&'r str, VaultError> {
        let Some(purpose) = purpose.filter(|p| !p.is_empty()) else {
            return Err(VaultError::InvalidArgument(
                "a read must state its purpose (e.g. purpose = billing)".into(),
            ));
        };
        regs.purposes.get_key_value(purpose).map(|(k, _)| k.as_str()).ok_or_else(|| {
            let known: Vec<&str> = regs.purposes.keys().map(String::as_str).collect();
            VaultError::InvalidArgument(format!(
                "unknown purpose '{}' (known: {})",
                catalogue::printable(purpose),
                known.join(", ")
            ))
        })
    }

    /// Validates field names and values; returns canonical values, sorted by name.
    fn check_fields(&self, regs: &Regulations, fields: &[FieldValue]) -> Result<Vec<FieldValue>, VaultError> {
        if fields.len() > self.limits.max_fields_per_record {
            return Err(VaultError::LimitExceeded(format!(
                "{} fields given; a record holds at most {}",
                fields.len(),
                self.limits.max_fields_per_record
            )));
        }
        let mut out = Vec::with_capacity(fields.len());
        for field in fields {
            if field.name == SUBJECT_FIELD {
                return Err(VaultError::InvalidArgument(
                    "subject_id is the record's subject, given as such, not as a field".into(),
                ));
            }
            let name = Self::check_field_name(regs, &field.name)?;
            if field.value.len() > self.limits.max_field_bytes {
                return Err(VaultError::LimitExceeded(format!(
                    "field '{name}' is larger than {} bytes",
                    self.limits.max_field_bytes
                )));
            }
            let text = std::str::from_utf8(field.value.expose_secret())
                .map_err(|_| VaultError::InvalidArgument(format!("field '{name}' is not UTF-8")))?;
            let kind = regs.fields[name].kind;
            let canonical = Zeroizing::new(catalogue::validate(name, kind, text)?);
            out.push(FieldValue { name: name.to_owned(), value: Plaintext::from_str_copy(&canonical) });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = out.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(VaultError::InvalidArgument(format!("field '{}' is given twice", w[0].name)));
        }
        Ok(out)
    }

    fn check_names<'r>(regs: &'r Regulations, names: &[String]) -> Result<Vec<&'r str>, VaultError> {
        let mut out: Vec<&str> =
            names.iter().map(|n| Self::check_field_name(regs, n)).collect::<Result<_, _>>()?;
        out.sort_unstable();
        out.dedup();
        Ok(out)
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
        match self.commit_repeatable(entry).await? {
            Some(seq) => self.audit.durable(seq).await,
            None => Ok(()),
        }
    }

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
    fn open_record(
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
        let regs = self.regulations();
        let record_id = uuid::Uuid::new_v4().to_string();
        let entry = self.draft(caller, Rpc::PutRecord, Operation::Write, &regs);
        let (fields, record_id, regs) = (&fields, &record_id, &regs);
        self.audited(
            entry,
            prepare!(|e| {
                let keys = self.unsealed()?;
                e.record_id.clone_from(record_id);
                self.check_subject(subject)?;
                e.subject = hex::encode(Self::subject_index(&keys, subject));
                if fields.is_empty() {
                    return Err(VaultError::InvalidArgument("a record needs at least one field".into()));
                }
                e.fields = fields.iter().map(|f| clean(&f.name)).collect();
                let fields = self.check_fields(regs, fields)?;
                let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
                let ask = Ask { op: Operation::Write, fields: &names, purpose: None, consent: None };
                self.decide(regs, caller, ask, e)?;

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
                    self.store.get_record(record_id).await?.ok_or(VaultError::NotFound("record"))?;
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

    async fn consent_state(
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
                    self.store.get_record(record_id).await?.ok_or(VaultError::NotFound("record"))?;
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
                    self.store.get_record(record_id).await?.ok_or(VaultError::NotFound("record"))?;
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
    fn subject_op(
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

    // ---- administration -------------------------------------------------------------------

    /// Decides an operation that involves no subject, fields or purpose; fills the entry.
    pub(crate) fn permit(
        &self,
        regs: &Regulations,
        caller: &Caller,
        op: Operation,
        e: &mut AuditEntry,
    ) -> Result<(), VaultError> {
        self.decide(regs, caller, Ask { op, fields: &[], purpose: None, consent: None }, e).map(|_| ())
    }

    /// Validates a new identity and stages it with its first token.
    pub(crate) async fn stage_identity(
        &self,
        regs: &Regulations,
        name: &str,
        role: &str,
        created_by: &str,
    ) -> Result<(IssuedToken, Changes), VaultError> {
        crate::vault::auth::check_identity_name(name)?;
        if !regs.roles.contains_key(role) {
            return Err(VaultError::InvalidArgument(format!(
                "role '{}' is not in the regulations in force",
                clean(role)
            )));
        }
        if self.store.get_identity(name).await?.is_some() {
            return Err(VaultError::AlreadyExists(format!("identity '{name}' already exists")));
        }
        let identity = StoredIdentity::new(name.to_owned(), role.to_owned(), created_by.to_owned(), now_ms());
        let mut changes = Changes::new();
        changes.create_identity(&identity);
        let token = self.stage_token(name, &mut changes)?;
        Ok((token, changes))
    }

    pub async fn list_identities(&self, caller: &Caller) -> Result<Vec<IdentityInfo>, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::ListIdentities, Operation::IdentityAdmin, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                self.permit(regs, caller, Operation::IdentityAdmin, e)?;
                let list = self
                    .store
                    .list_identities()
                    .await?
                    .into_iter()
                    .map(|i| IdentityInfo {
                        name: i.name,
                        role: i.role,
                        created_ms: i.created_ms,
                        created_by: i.created_by,
                        revoked_ms: i.revoked_ms,
                    })
                    .collect();
                Ok((list, Changes::none()))
            }),
        )
        .await
    }

    /// Revokes an identity: its tokens are deleted and it can never authenticate again.
    pub async fn revoke_identity(&self, caller: &Caller, name: &str) -> Result<(), VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::RevokeIdentity, Operation::IdentityAdmin, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                e.reason = format!("identity '{}'", clean(name));
                self.permit(regs, caller, Operation::IdentityAdmin, e)?;
                if name == caller.identity.name {
                    return Err(VaultError::PermissionDenied("an identity cannot revoke itself".into()));
                }
                let mut identity =
                    self.store.get_identity(name).await?.ok_or(VaultError::NotFound("identity"))?;
                let mut changes = Changes::new();
                let administers = |i: &StoredIdentity| {
                    let who = Identity { name: i.name.clone(), role: i.role.clone() };
                    let ask = Ask { op: Operation::IdentityAdmin, fields: &[], purpose: None, consent: None };
                    i.revoked_ms.is_none() && policy::decide(regs, &who, ask).is_ok()
                };
                if administers(&identity) {
                    // Someone must remain who can create and revoke identities; the commit re-checks
                    // that the ones counted on were not revoked meanwhile.
                    let others: Vec<StoredIdentity> = self
                        .store
                        .list_identities()
                        .await?
                        .into_iter()
                        .filter(|i| i.name != name && administers(i))
                        .collect();
                    if others.is_empty() {
                        return Err(VaultError::FailedPrecondition(format!(
                            "'{}' is the last identity that can administer identities; create another first",
                            clean(name)
                        )));
                    }
                    for other in &others {
                        changes.expect_identity(other);
                    }
                }
                identity.revoked_ms.get_or_insert(now_ms());
                changes.put_identity(&identity);
                for (token_id, _) in self.store.tokens_of(name).await? {
                    changes.remove_token(&token_id);
                }
                Ok(((), changes))
            }),
        )
        .await
    }

    pub async fn regulations_info(&self, caller: &Caller) -> Result<RegulationsInfo, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::GetRegulations, Operation::RegulationsAdmin, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                self.permit(regs, caller, Operation::RegulationsAdmin, e)?;
                Ok((Self::info(regs), Changes::none()))
            }),
        )
        .await
    }

    fn info(regs: &Regulations) -> RegulationsInfo {
        RegulationsInfo {
            version: regs.version.clone(),
            organisation: regs.organisation.clone(),
            roles: regs.roles.keys().cloned().collect(),
            purposes: regs.purposes.keys().cloned().collect(),
            fields: regs.fields.keys().cloned().collect(),
            warnings: regs.warnings.clone(),
        }
    }

    /// Re-reads the regulations file. An invalid file is refused and the rules in force stay.
    /// `caller` is `None` for the operator's SIGHUP.
    pub async fn reload_regulations(&self, caller: Option<&Caller>) -> Result<RegulationsInfo, VaultError> {
        let regs = self.regulations();
        let entry = match caller {
            Some(c) => self.draft(c, Rpc::ReloadRegulations, Operation::RegulationsAdmin, &regs),
            None => operator_entry(Rpc::Sighup, Operation::RegulationsAdmin, &regs),
        };
        let regs = &regs;
        let next = self
            .audited(entry, prepare!(|e| {
if let Some(caller) = caller {
                    self.permit(regs, caller, Operation::RegulationsAdmin, e)?;
                }
                let Some(path) = &self.regulations_path else {
                    return Err(VaultError::FailedPrecondition(
                        "no regulations file is configured (the embedded sample is in use); start with --regulations FILE"
                            .into(),
                    ));
                };
                let text = std::fs::read_to_string(path)
                    .map_err(|e| VaultError::FailedPrecondition(format!("cannot read {}: {e}", path.display())))?;
                let next = Regulations::parse(&text).map_err(|e| VaultError::InvalidArgument(e.to_string()))?;
                e.reason = format!("regulations {} replace {}", next.version, regs.version);
                // The new version is stored with this entry (in the data folder, or in the
                // database for every node).
                let by = caller.map_or("operator", |c| c.identity.name.as_str());
                let (changes, serial) = self.regulations_change(&next, by).await?;
                Ok(((next, serial), changes))
             }))
            .await?;
        let (next, serial) = next;
        for warning in &next.warnings {
            tracing::warn!(version = %next.version, "regulations: {warning}");
        }
        let info = Self::info(&next);
        self.install_regulations(next, serial);
        tracing::info!(version = %info.version, "regulations reloaded");
        Ok(info)
    }
}

/// The server log's line for one request (target `khlang::request`, level info): what it was, who
/// asked, what was decided and how it ended, how long it took — never a value, a subject or a
/// record id (those are in the audit log, which is protected; the server log is not).
struct RequestLine {
    rpc: String,
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
            rpc: entry.rpc.clone(),
            identity: entry.identity.clone(),
            role: entry.role.clone(),
            purpose,
            decision: entry.decision.as_str(),
            status: entry.outcome.name(),
            request_id: entry.request_id.clone(),
        }
    }

    fn log(self, seq: u64, took: Duration) {
        crate::metrics::request(&self.rpc, self.status, &self.role, &self.purpose, self.decision, took);
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

/// Witnessed heads as the wire gives them: `(seq, hash hex)`.
fn parse_witnessed(heads: &[(u64, String)]) -> Result<Vec<(u64, [u8; 32])>, VaultError> {
    if heads.len() > MAX_WITNESSED {
        return Err(VaultError::LimitExceeded(format!("more than {MAX_WITNESSED} witnessed heads")));
    }
    heads
        .iter()
        .enumerate()
        .map(|(i, (seq, hash))| {
            let hash =
                hex::decode(hash).ok().and_then(|b| <[u8; 32]>::try_from(b).ok()).ok_or_else(|| {
                    VaultError::InvalidArgument(format!("witnessed head {i}: the hash is not 64 hex digits"))
                })?;
            Ok((*seq, hash))
        })
        .collect()
}

/// An export begun by [`Vault::audit_export`] (the head it ends at is signed).
#[derive(Debug)]
pub struct AuditExport {
    public_key: Vec<u8>,
}

/// Permission to read the audit log with one filter: made only by [`Vault::audit_read`], after
/// the read was authorised and its own entry written, so no code path can read entries unaudited.
#[derive(Debug)]
pub struct AuditGrant {
    filter: AuditFilter,
}

impl AuditGrant {
    /// An unaudited grant, for tests that read a stopped vault's log in process.
    #[cfg(any(test, feature = "test-util"))]
    pub fn unaudited_for_tests(filter: AuditFilter) -> Self {
        Self { filter }
    }
}

impl Vault {
    /// Authorises a read of the audit log (itself audited) and resolves a subject id to the blind
    /// index the entries hold. The grant it returns is the only way to read entries.
    pub async fn audit_read(
        &self,
        caller: &Caller,
        rpc: Rpc,
        filter: AuditFilter,
        subject_id: Option<&str>,
    ) -> Result<AuditGrant, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, rpc, Operation::AuditRead, &regs);
        let (filter, regs) = (&filter, &regs);
        self.audited(
            entry,
            prepare!(|e| {
                let keys = self.unsealed()?;
                let mut filter = filter.clone();
                if let Some(subject) = subject_id.filter(|s| !s.is_empty()) {
                    self.check_subject(subject)?;
                    let index = hex::encode(Self::subject_index(&keys, subject));
                    e.subject.clone_from(&index);
                    filter.subject = Some(index);
                }
                e.reason = filter.describe();
                self.permit(regs, caller, Operation::AuditRead, e)?;
                Ok((AuditGrant { filter }, Changes::none()))
            }),
        )
        .await
    }

    /// Entries matching the grant's filter, oldest first.
    pub fn audit_entries(
        &self,
        grant: AuditGrant,
    ) -> impl Iterator<Item = Result<AuditEntry, VaultError>> + '_ {
        let filter = grant.filter;
        let limit = filter.limit.unwrap_or(usize::MAX);
        let written = self.audit.write_through().err().map(Err);
        written
            .into_iter()
            .chain(self.audit.read_entries().map(|r| r.map_err(VaultError::from)))
            .filter(move |r| r.as_ref().map_or(true, |e| filter.matches(e)))
            .take(limit)
    }

    /// Begins an export: the head is signed first, so an export always ends at a checkpoint its
    /// reader can verify with the public key. Its lines are [`Vault::export_lines`].
    pub async fn audit_export(&self, _grant: AuditGrant) -> Result<AuditExport, VaultError> {
        self.audit.checkpoint_now().await?;
        let public_key = self
            .audit
            .public_key()
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))?;
        Ok(AuditExport { public_key })
    }

    /// The export's JSON Lines (read synchronously: a blocking thread streams them).
    pub fn export_lines(&self, export: AuditExport) -> impl Iterator<Item = Result<String, VaultError>> + '_ {
        self.audit.export_lines(export.public_key).map(|r| r.map_err(VaultError::from))
    }

    /// Verifies the live log: chain, checkpoint signatures and their order, head tags, the
    /// store's records, that it ends at this vault's head, and that it holds every `witnessed`
    /// head. The head is signed first, so an intact log is covered up to its newest entry.
    pub async fn verify_audit(
        self: &Arc<Self>,
        caller: &Caller,
        witnessed: Vec<(u64, String)>,
    ) -> Result<(ChainReport, crate::audit::LogState), VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::VerifyAudit, Operation::AuditRead, &regs);
        let (regs, witnessed) = (&regs, &witnessed);
        let witnessed = self
            .audited(
                entry,
                prepare!(|e| {
                    self.unsealed()?;
                    self.permit(regs, caller, Operation::AuditRead, e)?;
                    let heads = parse_witnessed(witnessed)?;
                    e.reason = format!("{} witnessed heads", heads.len());
                    Ok((heads, Changes::none()))
                }),
            )
            .await?;
        let public_key = self
            .audit
            .public_key()
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))?;
        self.audit.checkpoint_now().await?;
        // A full read and hash of the log (about a second per million entries): on the blocking
        // pool, not on a worker that serves requests.
        let records = self.audit.stored_records(self.store.as_ref()).await?;
        let vault = self.clone();
        let report =
            tokio::task::spawn_blocking(move || vault.audit.verify(&records, &public_key, &witnessed))
                .await
                .map_err(|_| StoreError::Corrupt("audit verification task"))??;
        // Damage found now (the log edited while the vault ran, or on a shared database by
        // anyone who can write to it) is carried forward at once: no personal data moves while
        // the record of who saw it is in doubt.
        if report.uncarried.is_some() {
            self.audit.check_history(self.store.as_ref(), &report).await?;
        }
        Ok((report, self.audit.state()))
    }

    /// Verifies the whole audit log beside serving and carries damage forward (the tail since the
    /// last signed head was verified at unseal). Started once by the server after unsealing.
    pub async fn check_audit_history(self: &Arc<Self>) -> Result<(), VaultError> {
        let Some(public_key) = self.audit.public_key() else { return Ok(()) };
        let records = self.audit.stored_records(self.store.as_ref()).await?;
        // About a second per million entries: on the blocking pool, not on a serving worker.
        let vault = self.clone();
        let report = tokio::task::spawn_blocking(move || vault.audit.verify(&records, &public_key, &[]))
            .await
            .map_err(|_| StoreError::Corrupt("audit verification task"))??;
        self.audit.check_history(self.store.as_ref(), &report).await.map(|_| ())
    }

    /// A receiver that disconnects once this vault is dropped, store and all (its data folder's
    /// lock free): the last `Arc` may be let go by a server task a moment after `serve` returns.
    pub fn released(&self) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.released.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        rx
    }

    /// Whether the audit log's tail was verified at unseal (metrics: intact or unverified).
    pub fn audit_history_checked(&self) -> bool {
        self.audit.tail_checked()
    }

    /// How long ago the newest audit checkpoint was signed.
    pub async fn audit_checkpoint_age(&self) -> Option<Duration> {
        self.audit.checkpoint_age().await
    }

    /// Whether the audit log can be written now (health).
    pub async fn audit_writable(&self) -> bool {
        self.audit.writable().await
    }

    /// Whether the audit log holds a break the operator has not accepted (health).
    pub fn audit_state(&self) -> crate::audit::LogState {
        self.audit.state()
    }

    /// The operator's view (no caller, nothing audited): the public key, hex, of an unsealed vault.
    pub fn audit_public_key_now(&self) -> Result<String, VaultError> {
        self.audit
            .public_key()
            .map(hex::encode)
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))
    }

    /// The operator's verification of the live log (no caller): `khlangd archive-audit` and tests.
    pub async fn verify_audit_now(&self) -> Result<ChainReport, VaultError> {
        let public_key = self
            .audit
            .public_key()
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))?;
        let records = self.audit.stored_records(self.store.as_ref()).await?;
        self.audit.verify(&records, &public_key, &[])
    }

    /// The checkpoint-verifying public key, hex.
    pub async fn audit_public_key(&self, caller: &Caller) -> Result<String, VaultError> {
        self.audit_read(caller, Rpc::AuditPublicKey, AuditFilter::default(), None).await?;
        self.audit
            .public_key()
            .map(hex::encode)
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))
    }

    /// Moves audit entries older than `before_ms` out of the vault into `out` (the export format,
    /// verifiable offline), up to the newest signed checkpoint before that time, which stays to
    /// anchor what remains. Refused for anything younger than the regulations' retention (PCI DSS
    /// 10.5.1) and for a log that does not verify. The operator's command on a stopped vault
    /// (`khlangd archive-audit`), never an API. `now_ms` is the clock (tests pass a later one).
    /// A refused or empty run is on the record too: every attempt to remove history is.
    pub async fn archive_audit(
        &self,
        before_ms: u64,
        now_ms: u64,
        out: &mut std::fs::File,
    ) -> Result<ArchiveReport, VaultError> {
        let result = self.archive_now(before_ms, now_ms, out).await;
        let not_done = match &result {
            Err(e) => Some((e.outcome(), format!("refused: {}", clean(&e.to_string())))),
            Ok(r) if r.entries == 0 => {
                Some((crate::Outcome::Ok, "nothing to archive: no signed checkpoint is old enough".into()))
            }
            Ok(_) => None,
        };
        if let Some((outcome, why)) = not_done {
            let mut entry = operator_entry(Rpc::ArchiveAudit, Operation::AuditRead, &self.regulations());
            entry.outcome = outcome;
            entry.reason = format!("archival of entries older than {before_ms} ms {why}");
            let recorded = self.commit_now(entry, Changes::none()).await;
            // The refusal is the answer; failing to record it matters only when nothing else failed.
            if result.is_ok() {
                recorded?;
            }
        }
        result
    }

    async fn archive_now(
        &self,
        before_ms: u64,
        now_ms: u64,
        out: &mut std::fs::File,
    ) -> Result<ArchiveReport, VaultError> {
        use std::io::Write;
        let regs = self.regulations();
        let retention_ms = u64::from(regs.audit_retention_days) * 86_400_000;
        if before_ms > now_ms.saturating_sub(retention_ms) {
            return Err(VaultError::FailedPrecondition(format!(
                "entries younger than {} days are kept (PCI DSS 10.5.1); archive only before {} ms",
                regs.audit_retention_days,
                now_ms.saturating_sub(retention_ms)
            )));
        }
        let public_key = self
            .audit
            .public_key()
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))?;
        let records = self.audit.stored_records(self.store.as_ref()).await?;
        let report = self.audit.verify(&records, &public_key, &[])?;
        if let Some(b) = report.first_break {
            return Err(VaultError::FailedPrecondition(format!(
                "the log does not verify (first untrustworthy entry {}: {}); nothing archived",
                b.seq, b.reason
            )));
        }
        let first = self.audit.first_seq()?.unwrap_or(1);
        let last = self
            .audit
            .checkpoints()?
            .iter()
            .filter_map(|c| serde_json::from_slice::<crate::audit::StoredCheckpoint>(c).ok())
            .filter(|c| c.seq >= first && c.time_ms < before_ms)
            .map(|c| c.seq)
            .max();
        let Some(last) = last else {
            return Ok(ArchiveReport { first, last: first.saturating_sub(1), entries: 0 });
        };
        let io = |e: std::io::Error| VaultError::FailedPrecondition(format!("cannot write the archive: {e}"));
        for line in self.audit.archive_lines(public_key, last) {
            writeln!(out, "{}", line?).map_err(io)?;
        }
        out.flush().map_err(io)?;
        out.sync_all().map_err(io)?;
        // The archive is on disk; only now do the entries leave the vault.
        self.audit.remove_archived(last)?;
        self.store.remove_audit_entries_upto(last).await?;
        let mut entry = operator_entry(Rpc::ArchiveAudit, Operation::AuditRead, &regs);
        entry.reason = format!(
            "entries {first} to {last} ({} entries) older than {before_ms} ms archived; checkpoint {last} anchors the rest",
            last + 1 - first
        );
        self.commit_now(entry, Changes::none()).await?;
        Ok(ArchiveReport { first, last, entries: last + 1 - first })
    }

    /// The most passphrase derivations that ever ran at once (at most `auth::MAX_DERIVATIONS`).
    pub fn derivations_at_once_peak(&self) -> usize {
        self.derivations.peak()
    }

    /// Fault drill for tests: make every following audit append (and so every request) fail.
    #[cfg(any(test, feature = "test-util"))]
    pub fn inject_audit_failure(&self, fail: bool) {
        self.audit.inject_failure(fail);
    }
}
