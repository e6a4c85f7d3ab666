//! The key lifecycle (PCI DSS 3.6–3.7). Custodians unseal, seal, change their passphrases and
//! rekey; key admins rotate KEKs (a background job rewraps every data key under the new version,
//! never opening a field), retire versions that the store proves unused, and re-encrypt records.
//!
//! Background jobs persist their cursor and counters in the same atomic batch as the records each
//! step changes, so a crash (even `kill -9`) resumes exactly after the last committed step: no data
//! key is rewrapped twice or skipped.

pub mod rekey;

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use khlang_keys::{
    DataKey, Kek, KeyError, KeyShare, Plaintext, WrappedDataKey, combine_root_key, reseal, unseal_root_key,
    unseal_share,
};

use crate::audit::Rpc;
use crate::audit::{Committed, clean};
use crate::policy::Operation;
use crate::storage::{Changes, Cursor, Custody, JobKind, KeySpace, StoredField, StoredJob, StoredRecord};
#[cfg(feature = "bench")]
use crate::vault::FIRST_GENERATION;
use crate::vault::prepare;
use crate::vault::{SUBJECT_CONTEXT, Unsealed, custodian_entry, now_ms, operator_entry};
use crate::{Caller, CipherMode, Vault, VaultError};

/// How a background key job paces itself, so the vault keeps serving while it runs: records per
/// step; the share of its time the job may spend working while requests are being served (after
/// a step that took `t` with requests arriving, it rests `t × (100 − duty) / duty`; with none, not
/// at all); and a fixed pause between steps (tests use it to slow a job down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobPacing {
    pub batch: usize,
    pub duty_percent: u8,
    pub pause: Duration,
}

impl Default for JobPacing {
    /// 40% of its time while requests flow (full speed when idle): over a million records, a
    /// rotation under 64 concurrent readers left them 71–83% of their normal throughput in the runs
    /// recorded in bench/README.md (49% when the job never rests).
    fn default() -> Self {
        Self { batch: 512, duty_percent: 40, pause: Duration::ZERO }
    }
}

impl JobPacing {
    /// How long to rest after a step that took `worked`.
    pub fn rest_after(&self, worked: Duration) -> Duration {
        let duty = u32::from(self.duty_percent.clamp(1, 100));
        (worked * (100 - duty) / duty).max(self.pause)
    }
}

/// How often a node that does not hold the key-job lease tries to take it.
pub const JOB_LEASE_RETRY: Duration = Duration::from_secs(1);

/// Shortest passphrase a custodian may choose (PCI DSS 8.3.6: at least 12 characters).
pub const MIN_PASSPHRASE_CHARS: usize = 12;

/// Whether the vault is sealed, and how far unsealing has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealStatus {
    pub sealed: bool,
    pub threshold: u8,
    pub custodians: u8,
    /// Custodians whose shares have arrived since the vault was sealed.
    pub received: Vec<u8>,
    /// The rekey ceremony in progress, if any (without its nonce).
    pub rekey: Option<crate::vault::keyops::rekey::RekeyStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KekState {
    /// Wraps every new data key.
    Active,
    /// Still opens the data keys it wrapped; wraps nothing new.
    DecryptOnly,
    /// Destroyed.
    Retired,
}

impl KekState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::DecryptOnly => "decrypt-only",
            Self::Retired => "retired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekStatus {
    pub version: u32,
    pub state: KekState,
    pub created_ms: u64,
    pub retired_ms: Option<u64>,
    /// Data keys it wraps, counted from the store (when asked for).
    pub data_keys: Option<u64>,
    /// Older than the regulations' cryptoperiod and not retired.
    pub overdue: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    pub kind: JobKind,
    pub changed: u64,
    pub skipped: u64,
    pub total: u64,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub requested_by: String,
    /// Records per second since this process (re)started the job.
    pub rate_per_sec: f64,
    pub eta_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyStatus {
    pub versions: Vec<KekStatus>,
    pub job: Option<JobStatus>,
    pub cryptoperiod_days: Option<u32>,
}

/// What `Reencrypt` renews.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReencryptTarget {
    Record(String),
    Subject(String),
    /// Every record, by a background job.
    All,
}

/// Progress of the running job in this process: when it (re)started and how many records it had
/// processed then, for the rate and ETA.
#[derive(Debug, Default)]
pub(crate) struct JobMeter(std::sync::Mutex<Option<(Instant, u64)>>);

const JOB_IDENTITY: &str = "khlang-key-job";

fn wrong_passphrase(custodian: u8) -> VaultError {
    // Same answer whatever failed (passphrase, salt, tag): nothing says which part was wrong.
    VaultError::PermissionDenied(format!("wrong passphrase for custodian {custodian}'s share"))
}

fn job_kind_name(kind: JobKind) -> String {
    match kind {
        JobKind::Rewrap { target } => format!("rewrap to KEK v{target}"),
        JobKind::Reencrypt => "re-encryption".into(),
    }
}

fn running(job: &StoredJob) -> VaultError {
    VaultError::FailedPrecondition(format!(
        "a {} job is running ({} of {} records); try again when `khlang keys status` shows it finished",
        job_kind_name(job.kind),
        job.changed + job.skipped,
        job.total
    ))
}

impl Vault {
    // ---- custodians ---------------------------------------------------------------------------

    /// Status for anyone who asks (it is how custodians see unsealing progress), audited like
    /// every request.
    pub async fn seal_status_audited(
        &self,
        peer: Option<SocketAddr>,
        request_id: &str,
        client_request_id: &str,
    ) -> Result<SealStatus, VaultError> {
        let mut entry = custodian_entry(
            Rpc::SealStatus,
            String::new(),
            &self.regulations(),
            peer,
            request_id,
            client_request_id,
        );
        let status = self.seal_status().await?;
        entry.reason = if status.sealed { "sealed".into() } else { "unsealed".into() };
        self.commit_repeatable_now(entry).await?;
        Ok(status)
    }

    pub async fn seal_status(&self) -> Result<SealStatus, VaultError> {
        let (threshold, custodians) = match self.store.custody().await? {
            Custody::Single { .. } => (1, 1),
            Custody::Shares { threshold, sealed } => (threshold, sealed.len() as u8),
        };
        let mut received: Vec<u8> = self
            .pending_shares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(KeyShare::index)
            .collect();
        received.sort_unstable();
        Ok(SealStatus {
            sealed: self.is_sealed(),
            threshold,
            custodians,
            received,
            rekey: self.rekey_progress().await?,
        })
    }

    /// A custodian's passphrase opens their share; once the threshold is reached the root key is
    /// rebuilt and the vault serves. Slow on purpose (Argon2id): call it off the async runtime.
    /// Every attempt is audited; wrong passphrases count towards the address's lockout.
    pub async fn unseal_with(
        &self,
        custodian: u8,
        passphrase: &[u8],
        peer: Option<SocketAddr>,
        request_id: &str,
        client_request_id: &str,
    ) -> Result<SealStatus, VaultError> {
        let mut entry = custodian_entry(
            Rpc::Unseal,
            format!("custodian-{custodian}"),
            &self.regulations(),
            peer,
            request_id,
            client_request_id,
        );
        let was_sealed = self.is_sealed();
        let result = self.try_unseal(custodian, passphrase, peer.map(|p| p.ip())).await;
        match &result {
            Ok(s) if s.sealed => {
                entry.reason = format!("share {} of {} needed received", s.received.len(), s.threshold)
            }
            Ok(_) => entry.reason = "unsealed".into(),
            Err(e) => {
                entry.outcome = e.outcome();
                entry.reason = clean(&e.to_string());
            }
        }
        if let Err(e) = self.commit_custodian(entry).await {
            // Unaudited, so undone: a vault this call unsealed goes back to sealed.
            if was_sealed {
                self.drop_keys().await;
            }
            return Err(e);
        }
        match &result {
            Ok(s) if !s.sealed && was_sealed => tracing::info!(custodian, "vault unsealed"),
            Ok(s) if s.sealed => tracing::info!(
                custodian,
                received = s.received.len(),
                threshold = s.threshold,
                "unseal share received"
            ),
            Err(e) => tracing::warn!(custodian, status = e.code_name(), "unseal refused"),
            Ok(_) => {}
        }
        if result.as_ref().is_ok_and(|s| !s.sealed) {
            self.job_signal.notify_one();
            self.reload_if_asked().await;
        }
        result
    }

    /// Runs a passphrase's key derivation in one of the gate's few slots, after the caller's
    /// address (`from`; `None`: the operator's own process) has waited its turn if it tried this
    /// custodian wrongly too often (see `custodian_pace`): never a lockout.
    pub(crate) async fn passphrase_check<T>(
        &self,
        custodian: u8,
        from: Option<std::net::IpAddr>,
        derive: impl FnOnce() -> Result<T, KeyError>,
    ) -> Result<T, VaultError> {
        if let Some(ip) = from {
            let paced = || {
                VaultError::LimitExceeded(format!(
                    "custodian {custodian}'s passphrase was tried wrongly too often from this address; \
                     try again in a few seconds"
                ))
            };
            match self.custodian_pace.admit(custodian, ip, now_ms()) {
                Some(wait) if wait.is_zero() => {}
                Some(wait) => {
                    let _waiting = self.custodian_pace.wait_slot().ok_or_else(paced)?;
                    tokio::time::sleep(wait).await;
                }
                None => return Err(paced()),
            }
        }
        let _slot = self.derivations.enter()?;
        match derive() {
            Ok(v) => Ok(v),
            Err(KeyError::WrongPassphrase) => {
                if let Some(ip) = from {
                    self.custodian_pace.failed(custodian, ip, now_ms());
                }
                Err(wrong_passphrase(custodian))
            }
            Err(other) => Err(VaultError::Key(other)),
        }
    }

    async fn try_unseal(
        &self,
        custodian: u8,
        passphrase: &[u8],
        from: Option<std::net::IpAddr>,
    ) -> Result<SealStatus, VaultError> {
        if !self.is_sealed() {
            return Err(VaultError::FailedPrecondition("the vault is already unsealed".into()));
        }
        match self.store.custody().await? {
            Custody::Single { sealed_root } => {
                if custodian != 1 {
                    return Err(VaultError::InvalidArgument(
                        "this vault has a single custodian, number 1".into(),
                    ));
                }
                let root = self
                    .passphrase_check(custodian, from, || unseal_root_key(&sealed_root, passphrase))
                    .await?;
                self.install_root(root).await?;
            }
            Custody::Shares { threshold, sealed } => {
                let stored =
                    (custodian as usize).checked_sub(1).and_then(|i| sealed.get(i)).ok_or_else(|| {
                        VaultError::InvalidArgument(format!(
                            "custodian {custodian} does not exist (custodians are 1 to {})",
                            sealed.len()
                        ))
                    })?;
                let share =
                    self.passphrase_check(custodian, from, || unseal_share(stored, passphrase)).await?;
                let root = {
                    let mut pending = self.pending_shares.lock().unwrap_or_else(|p| p.into_inner());
                    pending.retain(|p| p.index() != share.index());
                    pending.push(share);
                    if pending.len() < threshold as usize {
                        None
                    } else {
                        let shares: Vec<&KeyShare> = pending.iter().collect();
                        let root = combine_root_key(&shares);
                        pending.clear();
                        Some(root.map_err(|_| VaultError::RootMismatch)?)
                    }
                };
                if let Some(root) = root {
                    self.install_root(root).await?;
                }
            }
        }
        self.seal_status().await
    }

    /// Wipes the keys from memory: until custodians unseal again only status and unseal answer.
    pub async fn seal(&self, caller: &Caller) -> Result<SealStatus, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::Seal, Operation::KeyAdmin, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                self.unsealed()?;
                self.permit(regs, caller, Operation::KeyAdmin, e)?;
                e.reason = "keys wiped from memory".into();
                Ok(((), Changes::none()))
            }),
        )
        .await?;
        self.audit.checkpoint_now().await?;
        self.drop_keys().await;
        tracing::warn!(by = %caller.identity.name, "vault sealed");
        self.seal_status().await
    }

    /// A custodian replaces their passphrase; the old one is the credential. Works sealed or not.
    pub async fn change_passphrase(
        &self,
        custodian: u8,
        old: &[u8],
        new: &[u8],
        peer: Option<SocketAddr>,
        request_id: &str,
        client_request_id: &str,
    ) -> Result<(), VaultError> {
        let mut entry = custodian_entry(
            Rpc::ChangePassphrase,
            format!("custodian-{custodian}"),
            &self.regulations(),
            peer,
            request_id,
            client_request_id,
        );
        let resealed = async {
            check_new_passphrase(new)?;
            if old == new {
                // Refused before any derivation: `old = new = guess` tells nothing about a guess.
                return Err(VaultError::InvalidArgument(
                    "the new passphrase must differ from the old one".into(),
                ));
            }
            let sealed = match self.store.custody().await? {
                Custody::Single { sealed_root } if custodian == 1 => sealed_root,
                Custody::Shares { sealed, .. } if custodian >= 1 && (custodian as usize) <= sealed.len() => {
                    sealed[custodian as usize - 1].clone()
                }
                _ => {
                    return Err(VaultError::InvalidArgument(format!("custodian {custodian} does not exist")));
                }
            };
            self.passphrase_check(custodian, peer.map(|p| p.ip()), || reseal(&sealed, old, new, &self.rng))
                .await
        }
        .await;
        match &resealed {
            Ok(_) => entry.reason = "passphrase changed".into(),
            Err(e) => {
                entry.outcome = e.outcome();
                entry.reason = clean(&e.to_string());
            }
        }
        // Audited before it takes effect: an unauditable change is not made.
        self.commit_custodian(entry).await?;
        self.store.replace_sealed(custodian, &resealed?).await?;
        Ok(())
    }

    // ---- KEK rotation and retirement ----------------------------------------------------------

    /// A new KEK version, active for new records at once; a background job rewraps every data key.
    pub async fn rotate(&self, caller: &Caller) -> Result<KeyStatus, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::RotateKey, Operation::KeyAdmin, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                let keys = self.unsealed()?;
                self.permit(regs, caller, Operation::KeyAdmin, e)?;
                self.require_encryption()?;
                self.follow_keks().await?;
                let current = self.store.job().await?;
                if let Some(job) = current.as_ref().filter(|j| j.finished_ms.is_none()) {
                    return Err(running(job));
                }
                let version = self.store.kek_infos().await?.last().map_or(1, |i| i.version + 1);
                let kek = Kek::generate(version, &self.rng)?;
                self.store.add_kek(version, &keys.root.wrap_kek(&kek, &self.rng)?, now_ms()).await?;
                keys.ring.write().unwrap_or_else(|p| p.into_inner()).insert(kek);
                let job = self.new_job(JobKind::Rewrap { target: version }, caller).await?;
                e.key_versions = crate::audit::KeyVersions::kek(version);
                e.reason = format!("KEK v{version} active; rewrapping {} data keys", job.total);
                let mut changes = Changes::new();
                changes.expect_job(current.as_ref());
                changes.put_job(&job);
                Ok(((), changes))
            }),
        )
        .await?;
        let status = self.key_status_now(false).await;
        if let Ok(s) = &status {
            let version = s.versions.last().map(|v| v.version);
            tracing::info!(by = %caller.identity.name, version, "KEK rotated; rewrapping data keys in the background");
        }
        self.job_signal.notify_one();
        status
    }

    fn require_encryption(&self) -> Result<(), VaultError> {
        match self.mode {
            CipherMode::Encrypted => Ok(()),
            #[cfg(feature = "bench")]
            CipherMode::PlaintextBaseline => {
                Err(VaultError::FailedPrecondition("this benchmark baseline stores no keys".into()))
            }
        }
    }

    async fn new_job(&self, kind: JobKind, caller: &Caller) -> Result<StoredJob, VaultError> {
        Ok(StoredJob {
            format: 1,
            kind,
            cursor: Vec::new(),
            changed: 0,
            skipped: 0,
            total: match kind {
                JobKind::Rewrap { .. } => self.store.count(KeySpace::DataKeys).await?,
                JobKind::Reencrypt => self.store.count(KeySpace::Records).await?,
            },
            started_ms: now_ms(),
            finished_ms: None,
            requested_by: caller.identity.name.clone(),
            auth: None,
        })
    }

    /// Versions, their state and age, and the job's progress; `counts` also counts the data keys
    /// under each version (a scan of every record).
    pub async fn key_status(&self, caller: &Caller, counts: bool) -> Result<KeyStatus, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::KeyStatus, Operation::KeyAdmin, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                self.permit(regs, caller, Operation::KeyAdmin, e)?;
                Ok((self.key_status_now(counts).await?, Changes::none()))
            }),
        )
        .await
    }

    async fn key_status_now(&self, counts: bool) -> Result<KeyStatus, VaultError> {
        let regs = self.regulations();
        let per_kek =
            if counts { Some(crate::storage::data_keys_per_kek(self.store.as_ref()).await?) } else { None };
        let infos = self.store.kek_infos().await?;
        let active = infos.iter().filter(|i| i.retired_ms.is_none()).map(|i| i.version).max();
        let now = now_ms();
        let versions = infos
            .iter()
            .map(|i| {
                let state = match (i.retired_ms, Some(i.version) == active) {
                    (Some(_), _) => KekState::Retired,
                    (None, true) => KekState::Active,
                    (None, false) => KekState::DecryptOnly,
                };
                KekStatus {
                    version: i.version,
                    state,
                    created_ms: i.created_ms,
                    retired_ms: i.retired_ms,
                    data_keys: per_kek.as_ref().map(|m| m.get(&i.version).copied().unwrap_or(0)),
                    overdue: state != KekState::Retired && overdue(i.created_ms, now, regs.cryptoperiod_days),
                }
            })
            .collect();
        let job = self.store.job().await?.map(|j| self.job_status(&j));
        Ok(KeyStatus { versions, job, cryptoperiod_days: regs.cryptoperiod_days })
    }

    fn job_status(&self, j: &StoredJob) -> JobStatus {
        let done = j.changed + j.skipped;
        let meter = *self.job_meter.0.lock().unwrap_or_else(|p| p.into_inner());
        let rate = match (j.finished_ms, meter) {
            (None, Some((since, at))) => {
                let secs = since.elapsed().as_secs_f64();
                if secs > 0.0 { done.saturating_sub(at) as f64 / secs } else { 0.0 }
            }
            (Some(fin), _) => {
                let secs = fin.saturating_sub(j.started_ms) as f64 / 1000.0;
                if secs > 0.0 { done as f64 / secs } else { 0.0 }
            }
            _ => 0.0,
        };
        let eta_secs = (j.finished_ms.is_none() && rate > 0.0)
            .then(|| (j.total.saturating_sub(done) as f64 / rate).ceil() as u64);
        JobStatus {
            kind: j.kind,
            changed: j.changed,
            skipped: j.skipped,
            total: j.total,
            started_ms: j.started_ms,
            finished_ms: j.finished_ms,
            requested_by: j.requested_by.clone(),
            rate_per_sec: rate,
            eta_secs,
        }
    }

    /// Destroys KEK `version`, only when the store proves no data key references it. The proof
    /// and the destruction happen while no other change can commit, and every write that wraps a
    /// data key expects its version to be live, so none can slip in between.
    pub async fn retire(&self, caller: &Caller, version: u32) -> Result<(), VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::RetireKey, Operation::KeyAdmin, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                let keys = self.unsealed()?;
                self.permit(regs, caller, Operation::KeyAdmin, e)?;
                e.key_versions = crate::audit::KeyVersions::kek(version);
                self.follow_keks().await?;
                let info = self
                    .store
                    .kek_infos()
                    .await?
                    .into_iter()
                    .find(|i| i.version == version)
                    .ok_or(VaultError::NotFound("key version"))?;
                if info.retired_ms.is_some() {
                    return Err(VaultError::FailedPrecondition(format!("KEK v{version} is already retired")));
                }
                if keys.ring().active_version() == Some(version) {
                    return Err(VaultError::FailedPrecondition(format!(
                        "KEK v{version} is the active version; rotate first (`khlang keys rotate`)"
                    )));
                }
                // The proof and the destruction run with commits held off (see `retire_now`).
                {
                    let _held = self.audit.hold_commits().await;
                    self.retire_now(version).await?;
                }
                e.reason = format!("KEK v{version} destroyed; no data key referenced it");
                Ok(((), Changes::none()))
            }),
        )
        .await?;
        Ok(())
    }

    /// Runs with commits held off: counts references and destroys the key, so no write can add a
    /// reference in between (and every write that wraps a data key expects its version live).
    pub(crate) async fn retire_now(&self, version: u32) -> Result<(), VaultError> {
        let refs =
            crate::storage::data_keys_per_kek(self.store.as_ref()).await?.get(&version).copied().unwrap_or(0);
        if refs > 0 {
            return Err(VaultError::FailedPrecondition(format!(
                "{refs} data keys still reference KEK v{version}; wait for the rewrap to finish \
                 (`khlang keys status`) and try again"
            )));
        }
        self.store.retire_kek(version, now_ms()).await?;
        if let Ok(keys) = self.unsealed() {
            keys.ring.write().unwrap_or_else(|p| p.into_inner()).remove(version);
        }
        Ok(())
    }

    // ---- re-encryption ------------------------------------------------------------------------

    /// Fresh data keys and ciphertexts: one record or a subject's records now, or every record by
    /// a background job. Values do not change; nothing leaves the vault.
    pub async fn reencrypt(&self, caller: &Caller, target: ReencryptTarget) -> Result<u64, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::Reencrypt, Operation::KeyAdmin, &regs);
        let (regs, target) = (&regs, &target);
        let n = self
            .audited(
                entry,
                prepare!(|e| {
                    let keys = self.unsealed()?;
                    self.permit(regs, caller, Operation::KeyAdmin, e)?;
                    self.require_encryption()?;
                    let mut changes = Changes::new();
                    let ids: Vec<String> = match &target {
                        ReencryptTarget::All => {
                            let current = self.store.job().await?;
                            if let Some(job) = current.as_ref().filter(|j| j.finished_ms.is_none()) {
                                return Err(running(job));
                            }
                            let job = self.new_job(JobKind::Reencrypt, caller).await?;
                            e.reason = format!("re-encrypting all {} records in the background", job.total);
                            changes.expect_job(current.as_ref());
                            changes.put_job(&job);
                            return Ok((job.total, changes));
                        }
                        ReencryptTarget::Record(id) => {
                            Vault::check_record_id(id)?;
                            e.record_id.clone_from(id);
                            vec![id.clone()]
                        }
                        ReencryptTarget::Subject(subject) => {
                            self.check_subject(subject)?;
                            let index = Vault::subject_index(&keys, subject);
                            e.subject = hex::encode(index);
                            self.store
                                .records_of_subject(&index)
                                .await?
                                .into_iter()
                                .map(|(id, _)| id)
                                .collect()
                        }
                    };
                    for id in &ids {
                        let (record, read) =
                            self.store.get_record(id).await?.ok_or(VaultError::NotFound("record"))?;
                        e.subject = hex::encode(record.subject_index);
                        let next = self.reencrypted(&keys, id, &record)?;
                        e.key_versions = Vault::key_versions(&next.wrapped_key);
                        changes.expect_kek_live(next_kek(&next)?);
                        changes.replace_record_and_key(id, read, &record, &next);
                    }
                    e.reason = format!("{} records re-encrypted", ids.len());
                    Ok((ids.len() as u64, changes))
                }),
            )
            .await?;
        self.job_signal.notify_one();
        Ok(n)
    }

    /// The record under a new data key (next generation, wrapped by the active KEK), every field
    /// and the subject id sealed afresh.
    fn reencrypted(
        &self,
        keys: &Unsealed,
        id: &str,
        record: &StoredRecord,
    ) -> Result<StoredRecord, VaultError> {
        let old = self
            .unwrap_dek(keys, id, &record.wrapped_key)?
            .ok_or_else(|| VaultError::FailedPrecondition("this benchmark baseline stores no keys".into()))?;
        // Wrapping to an old generation would let stale envelopes open: refuse instead.
        let generation = old.generation().checked_add(1).ok_or_else(|| {
            VaultError::FailedPrecondition(format!("record {id}: its data key generations are exhausted"))
        })?;
        let dek = DataKey::generate(generation, &self.rng)?;
        let wrapped = keys.ring().wrap_data_key(&dek, id.as_bytes(), &self.rng)?;
        let mut plain: Vec<(String, Plaintext)> = Vec::with_capacity(record.fields.len() + 1);
        for f in &record.fields {
            plain.push((f.name.clone(), self.open_value(Some(&old), id, &f.name, &f.envelope)?));
        }
        plain.push((
            SUBJECT_CONTEXT.into(),
            self.open_value(Some(&old), id, SUBJECT_CONTEXT, &record.subject)?,
        ));
        let refs: Vec<(&str, &Plaintext)> = plain.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let mut envelopes = self.seal_values(Some(&dek), id, &refs)?;
        let subject = envelopes.pop().unwrap_or_default();
        let fields = record
            .fields
            .iter()
            .zip(envelopes)
            .map(|(f, envelope)| StoredField { name: f.name.clone(), envelope })
            .collect();
        Ok(StoredRecord { wrapped_key: wrapped.as_bytes().to_vec(), subject, fields, ..record.clone() })
    }

    // ---- the background job -------------------------------------------------------------------

    /// Brings this node's key ring to the store's live KEKs: versions another node added (its
    /// rotation) are unwrapped and loaded, versions it destroyed are dropped. `Ok(true)`: changed.
    /// Run by [`crate::vault::cluster::follow`]; until then a read of a record wrapped under a
    /// version not loaded yet answers `Unavailable`, never a false integrity alarm.
    pub(crate) async fn follow_keks(&self) -> Result<bool, VaultError> {
        let Ok(keys) = self.unsealed() else { return Ok(false) };
        let stored = self.store.keks().await?;
        let have: std::collections::BTreeSet<u32> = keys.ring().versions().collect();
        let live: std::collections::BTreeSet<u32> = stored.iter().map(|(v, _)| *v).collect();
        if have == live {
            return Ok(false);
        }
        let mut added = Vec::new();
        for (version, wrapped) in &stored {
            if !have.contains(version) {
                let kek = keys.root.unwrap_kek(wrapped).map_err(|_| VaultError::RootMismatch)?;
                if kek.version() != *version {
                    return Err(crate::StoreError::Corrupt("kek version").into());
                }
                added.push(kek);
            }
        }
        let mut ring = keys.ring.write().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<u32> = have.difference(&live).copied().collect();
        for kek in added {
            tracing::info!(version = kek.version(), "loaded a KEK version another node added");
            ring.insert(kek);
        }
        for version in gone {
            tracing::info!(version, "dropped a KEK version another node destroyed");
            ring.remove(version);
        }
        Ok(true)
    }

    /// One step of the job: up to `pacing.batch` records, committed with the job's new cursor and
    /// counters and an audit entry in one atomic batch. `Ok(true)`: more to do.
    pub(crate) async fn job_step(&self) -> Result<bool, VaultError> {
        let Some(mut job) = self.store.job().await?.filter(|j| j.finished_ms.is_none()) else {
            *self.job_meter.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Ok(false);
        };
        // Every step applies only over the job as read here: were a second runner to read it too
        // (another node, before the lease moved), one of the two steps commits and the other
        // conflicts, so no record is counted twice.
        let read = job.clone();
        let Ok(keys) = self.unsealed() else { return Ok(false) };
        // The rotation may have been started on another node: wrap under what it made active.
        self.follow_keks().await?;
        {
            let mut meter = self.job_meter.0.lock().unwrap_or_else(|p| p.into_inner());
            meter.get_or_insert((Instant::now(), job.changed + job.skipped));
        }
        // A rewrap walks the data keys (`d‖id`, 61 bytes each); a re-encryption walks the records.
        let space = match job.kind {
            JobKind::Rewrap { .. } => KeySpace::DataKeys,
            JobKind::Reencrypt => KeySpace::Records,
        };
        let cursor = Cursor::from_bytes(job.cursor.clone());
        let batch = self.store.walk(space, &cursor, self.job_pacing.batch.max(1)).await?;
        let regs = self.regulations();
        let mut entry = operator_entry(Rpc::KeyJob, Operation::KeyAdmin, &regs);
        entry.identity = JOB_IDENTITY.into();
        let mut changes = Changes::new();
        if batch.is_empty() {
            if let JobKind::Rewrap { target } = job.kind {
                let left: u64 = crate::storage::data_keys_per_kek(self.store.as_ref())
                    .await?
                    .iter()
                    .filter(|(v, _)| **v != target)
                    .map(|(_, n)| n)
                    .sum();
                if left > 0 {
                    // A write that wrapped under the old version just before the rotation landed
                    // behind the cursor: go round again (done records are skipped quickly).
                    job.cursor.clear();
                    changes.expect_job(Some(&read));
                    changes.put_job(&job);
                    entry.reason = format!("{left} data keys still under older versions; another pass");
                    self.commit_step(entry, changes).await?;
                    return Ok(true);
                }
            }
            job.finished_ms = Some(now_ms());
            changes.expect_job(Some(&read));
            changes.put_job(&job);
            entry.reason = format!(
                "{} finished: {} records changed, {} already current, {} at the start",
                job_kind_name(job.kind),
                job.changed,
                job.skipped,
                job.total
            );
            let reason = entry.reason.clone();
            if !self.commit_step(entry, changes).await? {
                return Ok(true);
            }
            tracing::info!("{reason}");
            return Ok(false);
        }
        let first = batch.first().map(|w| w.record_id.clone()).unwrap_or_default();
        let mut changed = 0u64;
        for walked in &batch {
            let id = walked.record_id.as_str();
            match job.kind {
                JobKind::Rewrap { target } => {
                    let stored = WrappedDataKey::from_bytes(walked.value.clone());
                    let integrity =
                        |_| VaultError::Integrity { record_id: id.to_owned(), what: "data key".into() };
                    if stored.kek_version().map_err(integrity)? == target {
                        job.skipped += 1;
                        continue;
                    }
                    let ring = keys.ring();
                    let dek = ring.unwrap_data_key(&stored, id.as_bytes()).map_err(integrity)?;
                    let wrapped = ring.wrap_data_key(&dek, id.as_bytes(), &self.rng)?;
                    changes.expect_kek_live(wrapped.kek_version()?);
                    changes.replace_data_key(id, walked.version.clone(), wrapped.as_bytes());
                }
                JobKind::Reencrypt => {
                    // Read with its data key (a consistent pair) rather than from the scan.
                    let Some((record, read)) = self.store.get_record(id).await? else { continue };
                    if record.created_ms > job.started_ms {
                        job.skipped += 1;
                        continue;
                    }
                    let next = self.reencrypted(&keys, id, &record)?;
                    changes.expect_kek_live(next_kek(&next)?);
                    changes.replace_record_and_key(id, read, &record, &next);
                }
            }
            job.changed += 1;
            changed += 1;
        }
        job.cursor = batch.last().map(|w| w.cursor.as_bytes().to_vec()).unwrap_or_default();
        changes.expect_job(Some(&read));
        changes.put_job(&job);
        entry.reason = format!(
            "{}: {changed} of {} records from {} changed",
            job_kind_name(job.kind),
            batch.len(),
            clean(&first)
        );
        // A conflict (a request changed one of these records meanwhile): the step runs again from
        // the same cursor, nothing of it written.
        self.commit_step(entry, changes).await?;
        Ok(true)
    }

    /// Commits a job step durably; `Ok(false)`: it conflicted and wrote nothing.
    async fn commit_step(
        &self,
        entry: crate::audit::AuditEntry,
        changes: Changes,
    ) -> Result<bool, VaultError> {
        match self.audit.commit(self.store.as_ref(), entry, changes).await? {
            Committed::Done(_) => {
                self.audit.sync_now()?;
                self.store.flush_now().await?;
                Ok(true)
            }
            Committed::Conflict => Ok(false),
        }
    }
}

/// Field values of the records the rotation benchmark stores in bulk: the eight fields of
/// `khlang bench`, canonical, so the records are like those the API writes.
#[cfg(feature = "bench")]
const BULK_FIELDS: &[(&str, &str)] = &[
    ("billing_address", "99/1 Ratchadamnoen Rd, Nakhon Si Thammarat"),
    ("card_number", "4111111111111111"),
    ("email", "somchai.bench@example.go.th"),
    ("home_address", "99/1 ถนนราชดำเนิน ตำบลในเมือง อำเภอเมืองนครศรีธรรมราช"),
    ("name", "สมชาย ใจดี"),
    ("national_id", "1101700203450"),
    ("phone", "+66812345678"),
    ("postal_code", "80000"),
];

impl Vault {
    /// Benchmark setup only: stores `n` encrypted records (real data keys, wrapped by the active
    /// KEK) straight into the store in large batches, without the API or the audit log, so a
    /// rotation can be measured over a million records. Reports progress through `progress`.
    /// Only in `bench` builds.
    #[cfg(feature = "bench")]
    pub async fn bench_populate(&self, n: u64, progress: impl Fn(u64)) -> Result<(), VaultError> {
        let keys = self.unsealed()?;
        self.require_encryption()?;
        let values: Vec<(&str, Plaintext)> =
            BULK_FIELDS.iter().map(|(k, v)| (*k, Plaintext::from_str_copy(v))).collect();
        let mut done = 0u64;
        while done < n {
            let mut changes = Changes::new();
            for _ in 0..(n - done).min(10_000) {
                let id = uuid::Uuid::new_v4().to_string();
                let subject = format!("bench-bulk-{}", done % 100_000);
                let dek = DataKey::generate(FIRST_GENERATION, &self.rng)?;
                let wrapped = keys.ring().wrap_data_key(&dek, id.as_bytes(), &self.rng)?;
                let subject_plain = Plaintext::from_str_copy(&subject);
                let mut refs: Vec<(&str, &Plaintext)> = values.iter().map(|(k, v)| (*k, v)).collect();
                refs.push((SUBJECT_CONTEXT, &subject_plain));
                let mut envelopes = self.seal_values(Some(&dek), &id, &refs)?;
                let subject_env = envelopes.pop().unwrap_or_default();
                let fields = BULK_FIELDS
                    .iter()
                    .zip(envelopes)
                    .map(|((name, _), envelope)| StoredField { name: (*name).to_owned(), envelope })
                    .collect();
                let record = StoredRecord::new(
                    wrapped.as_bytes().to_vec(),
                    Vault::subject_index(&keys, &subject),
                    subject_env,
                    fields,
                    now_ms(),
                );
                changes.insert_record(&id, &record);
                done += 1;
            }
            // Fresh ids, no expectations: the commit cannot conflict.
            self.store.commit(changes).await?;
            progress(done);
        }
        self.store.flush_now().await?;
        Ok(())
    }

    pub async fn record_count(&self) -> Result<u64, VaultError> {
        Ok(self.store.count(KeySpace::Records).await?)
    }
}

/// Whether a key created at `created_ms` has outlived the cryptoperiod (unknown age: never).
fn overdue(created_ms: u64, now_ms: u64, cryptoperiod_days: Option<u32>) -> bool {
    let Some(days) = cryptoperiod_days else { return false };
    created_ms > 0 && now_ms.saturating_sub(created_ms) > u64::from(days) * 86_400_000
}

fn next_kek(record: &StoredRecord) -> Result<u32, VaultError> {
    Ok(WrappedDataKey::from_bytes(record.wrapped_key.clone()).kek_version()?)
}

pub(crate) fn check_new_passphrase(p: &[u8]) -> Result<(), VaultError> {
    let chars = String::from_utf8_lossy(p).chars().count();
    if chars < MIN_PASSPHRASE_CHARS {
        return Err(VaultError::InvalidArgument(format!(
            "a custodian's passphrase needs at least {MIN_PASSPHRASE_CHARS} characters"
        )));
    }
    Ok(())
}

/// The background key-job runner (and, on a store shared with other nodes, the task that follows
/// their KEK changes); [`KeyJobs::stop`] waits for a step in flight to finish.
#[derive(Debug)]
pub struct KeyJobs {
    stopping: Arc<std::sync::atomic::AtomicBool>,
    signal: Arc<tokio::sync::Notify>,
    handle: tokio::task::JoinHandle<()>,
    follower: Option<tokio::task::JoinHandle<()>>,
}

impl KeyJobs {
    /// Stops the runner after its current step; the step's batch is committed or not at all.
    /// The key-job lease, if this node held it, is given up.
    pub async fn stop(self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        self.signal.notify_one();
        if let Some(follower) = self.follower {
            follower.abort();
        }
        let _ = self.handle.await;
    }
}

/// Runs background key jobs while the vault is served: woken by rotations and unseals, and every
/// second in case a job was left unfinished by a restart (or started on another node). On a store
/// several nodes share, only the holder of the store's key-job lease runs them, and only while
/// unsealed; the others retry for the lease every [`JOB_LEASE_RETRY`]. Holds the vault only
/// during a step.
pub fn spawn_key_jobs(vault: &Arc<Vault>) -> KeyJobs {
    let weak: Weak<Vault> = Arc::downgrade(vault);
    let signal = vault.job_signal.clone();
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sig, stop) = (signal.clone(), stopping.clone());
    let follower = vault
        .store
        .shared_chain()
        .is_some()
        .then(|| tokio::spawn(crate::vault::cluster::follow(Arc::downgrade(vault))));
    let handle = tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let Some(vault) = weak.upgrade() else { return };
            let ready = vault.unsealed().is_ok();
            let leads = match vault.store.hold_job_lease(ready).await {
                Ok(leads) => leads,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot ask for the key-job lease; retrying");
                    false
                }
            };
            if !leads {
                drop(vault);
                tokio::select! {
                    _ = sig.notified() => {}
                    _ = tokio::time::sleep(JOB_LEASE_RETRY) => {}
                }
                continue;
            }
            let pacing = vault.job_pacing;
            let requests_before = vault.requests_seen();
            let counter = vault.clone();
            let started = Instant::now();
            // A step unwraps and wraps hundreds of keys: on the blocking pool, driving its store
            // calls there, so the workers keep serving requests.
            let runtime = tokio::runtime::Handle::current();
            let step = tokio::task::spawn_blocking(move || runtime.block_on(vault.job_step())).await;
            // Rest only while requests are being served: an idle vault rotates at full speed.
            let busy = counter.requests_seen() != requests_before;
            drop(counter);
            let pause = if busy { pacing.rest_after(started.elapsed()) } else { pacing.pause };
            let more = match step {
                Ok(Ok(more)) => more,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "key job step failed; retrying in a second");
                    false
                }
                Err(_) => false,
            };
            if more && pause.is_zero() {
                continue;
            }
            let wait = if more { pause } else { Duration::from_secs(1) };
            tokio::select! {
                _ = sig.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(vault) = weak.upgrade() {
            let _ = vault.store.hold_job_lease(false).await;
        }
    });
    KeyJobs { stopping, signal, handle, follower }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_is_overdue_only_past_its_cryptoperiod() {
        let day = 86_400_000;
        let now = 400 * day;
        assert!(!overdue(now - 365 * day, now, Some(365)), "exactly at the limit");
        assert!(overdue(now - 365 * day - 1, now, Some(365)));
        assert!(!overdue(now - 399 * day, now, None), "no cryptoperiod set");
        assert!(!overdue(0, now, Some(1)), "age unknown (created before ages were kept)");
    }

    #[test]
    fn pacing_rests_in_proportion_to_the_work() {
        let ms = Duration::from_millis;
        let full = JobPacing { duty_percent: 100, ..JobPacing::default() };
        assert_eq!(full.rest_after(ms(8)), Duration::ZERO);
        let half = JobPacing { duty_percent: 50, ..full };
        assert_eq!(half.rest_after(ms(8)), ms(8));
        let quarter = JobPacing { duty_percent: 25, ..full };
        assert_eq!(quarter.rest_after(ms(8)), ms(24));
        let paced = JobPacing { pause: ms(15), ..half };
        assert_eq!(paced.rest_after(ms(8)), ms(15), "the fixed pause is a floor");
        assert_eq!(JobPacing { duty_percent: 0, ..full }.rest_after(ms(1)), ms(99), "0 reads as 1%");
    }

    #[test]
    fn short_custodian_passphrases_are_refused() {
        assert!(check_new_passphrase("eleven char".as_bytes()).is_err());
        assert!(check_new_passphrase("twelve chars".as_bytes()).is_ok());
        assert!(check_new_passphrase("ครบสิบสองตัวอักษรนะ".as_bytes()).is_ok(), "characters, not bytes");
    }
}
