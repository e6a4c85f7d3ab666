//! Rekeying under dual control (PCI DSS 3.6.1.2, 3.7.6). A key admin only starts a ceremony: a
//! new root key, split at once among the new custodians, each share bound to a named identity
//! (all different, none the key admin). Only that identity, with its own token, seals its share
//! under a passphrase it gives (one call per share; no call sets two), so the key admin cannot
//! set the new custodians' passphrases itself; the status names who holds each share and whether
//! it is set, for the approvers to check. Then as many
//! current custodians as unsealing needs approve, each with their current passphrase. The approval
//! that reaches the threshold proves the current root key (the approving shares combine to it)
//! and replaces it: every KEK and the derivation key are rewrapped, every share replaced.
//!
//! The ceremony lives in memory only: a restart or a seal abandons it, and nothing was changed.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use khlang_keys::{
    KeyError, KeyShare, RandomSource, RootKey, combine_root_key, seal_root_key, seal_share, split_root_key,
    unseal_root_key, unseal_share,
};
use zeroize::Zeroizing;

use crate::audit::Rpc;
use crate::audit::clean;
use crate::policy::Operation;
use crate::storage::{Changes, Custody};
use crate::vault::keyops::check_new_passphrase;
use crate::vault::prepare;
use crate::vault::{custodian_entry, now_ms};
use crate::{Caller, Vault, VaultError};

/// How long a ceremony may take before it is abandoned, by default (`VaultOptions::rekey_ttl`).
pub const REKEY_TTL: Duration = Duration::from_secs(60 * 60);
const NONCE_BYTES: usize = 16;

/// A ceremony's progress, as custodians and the key admin see it.
#[derive(Clone, PartialEq, Eq)]
pub struct RekeyStatus {
    /// Only in the answer to the key admin who started it: the custodians' calls need it.
    pub nonce: Option<String>,
    pub threshold: u8,
    pub custodians: u8,
    pub passphrases_set: Vec<u8>,
    pub approved: Vec<u8>,
    pub approvals_needed: u8,
    pub started_by: String,
    pub expires_ms: u64,
    pub done: bool,
    /// Each new share: the identity bound to it, and whether it has set its passphrase.
    pub slots: Vec<RekeySlot>,
}

/// A new share of the ceremony and the identity bound to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RekeySlot {
    pub custodian: u8,
    pub holder: String,
    pub set: bool,
}

impl fmt::Debug for RekeyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RekeyStatus")
            .field("nonce", &self.nonce.as_ref().map(|_| ".."))
            .field("threshold", &self.threshold)
            .field("custodians", &self.custodians)
            .field("passphrases_set", &self.passphrases_set)
            .field("approved", &self.approved)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// The new split waiting for its passphrases and approvals. Shares leave memory sealed.
pub(crate) struct Ceremony {
    nonce: Zeroizing<String>,
    threshold: u8,
    custodians: u8,
    root: RootKey,
    /// Per new custodian: the share not yet sealed (`None` for a whole-key custody).
    shares: Vec<Option<KeyShare>>,
    /// Per new custodian: their share (or the whole root key) sealed under their passphrase.
    sealed: Vec<Option<Vec<u8>>>,
    /// Keys the constant-time comparison of a presented nonce.
    digest_key: ring::hmac::Key,
    /// Current custodians' shares that approved (a whole-key custody approves at once).
    approvals: Vec<KeyShare>,
    /// Per new custodian: the identity that alone may set its passphrase.
    holders: Vec<String>,
    started_by: String,
    expires_ms: u64,
}

impl fmt::Debug for Ceremony {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ceremony").field("custodians", &self.custodians).finish_non_exhaustive()
    }
}

impl Ceremony {
    fn status(&self, approvals_needed: u8) -> RekeyStatus {
        let set = (1..=self.custodians).filter(|j| self.sealed[*j as usize - 1].is_some()).collect();
        let mut approved: Vec<u8> = self.approvals.iter().map(KeyShare::index).collect();
        approved.sort_unstable();
        RekeyStatus {
            nonce: None,
            threshold: self.threshold,
            custodians: self.custodians,
            passphrases_set: set,
            approved,
            approvals_needed,
            started_by: self.started_by.clone(),
            expires_ms: self.expires_ms,
            done: false,
            slots: self
                .holders
                .iter()
                .zip(1u8..)
                .map(|(holder, j)| RekeySlot {
                    custodian: j,
                    holder: holder.clone(),
                    set: self.sealed[j as usize - 1].is_some(),
                })
                .collect(),
        }
    }

    fn nonce_matches(&self, nonce: &str) -> bool {
        // A MAC comparison is constant-time; the nonce is a credential of the ceremony.
        let tag = ring::hmac::sign(&self.digest_key, self.nonce.as_bytes());
        ring::hmac::verify(&self.digest_key, nonce.as_bytes(), tag.as_ref()).is_ok()
    }

    fn missing(&self) -> Vec<String> {
        (1..=self.custodians)
            .filter(|j| self.sealed[*j as usize - 1].is_none())
            .map(|j| j.to_string())
            .collect()
    }
}

/// The current split's threshold.
fn approvals_needed(custody: &Custody) -> u8 {
    match custody {
        Custody::Single { .. } => 1,
        Custody::Shares { threshold, .. } => *threshold,
    }
}

fn no_ceremony() -> VaultError {
    VaultError::FailedPrecondition("no rekey ceremony is in progress (a key admin starts one)".into())
}

impl Vault {
    /// Starts a ceremony for a new split, any `threshold` of `custodians`. The answer carries the
    /// nonce the custodians' calls need; nothing changes until the ceremony completes.
    pub async fn start_rekey(
        &self,
        caller: &Caller,
        threshold: u8,
        custodians: u8,
        holders: &[String],
    ) -> Result<RekeyStatus, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::Rekey, Operation::KeyAdmin, &regs);
        let regs = &regs;
        self.audited(entry, prepare!(|e| {
self.unsealed()?;
            self.permit(regs, caller, Operation::KeyAdmin, e)?;
            if custodians == 0 || threshold > custodians || (custodians > 1 && threshold < 2) {
                return Err(VaultError::InvalidArgument(
                    "the threshold must be between 2 and the number of custodians (or both 1)".into(),
                ));
            }
            self.check_holders(caller, custodians, holders).await?;
            let mut slot = self.rekey.lock().await;
            if let Some(c) = slot.as_ref().filter(|c| now_ms() < c.expires_ms) {
                return Err(VaultError::FailedPrecondition(format!(
                    "a rekey ceremony started by '{}' is in progress; cancel it first",
                    c.started_by
                )));
            }
            let root = RootKey::generate(&self.rng)?;
            let shares: Vec<Option<KeyShare>> = if custodians == 1 {
                vec![None]
            } else {
                split_root_key(&root, threshold, custodians, &self.rng)?.into_iter().map(Some).collect()
            };
            let mut nonce = [0u8; NONCE_BYTES];
            self.rng.fill(&mut nonce)?;
            let mut digest = [0u8; 32];
            self.rng.fill(&mut digest)?;
            let ceremony = Ceremony {
                nonce: Zeroizing::new(hex::encode(nonce)),
                threshold: threshold.max(1),
                custodians,
                root,
                shares,
                sealed: vec![None; custodians as usize],
                digest_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &digest),
                approvals: Vec::new(),
                holders: holders.to_vec(),
                started_by: caller.identity.name.clone(),
                expires_ms: now_ms().saturating_add(u64::try_from(self.rekey_ttl.as_millis()).unwrap_or(u64::MAX)),
            };
            let mut status = ceremony.status(approvals_needed(&self.store.custody().await?));
            status.nonce = Some(ceremony.nonce.to_string());
            e.reason = clean(&format!(
                "rekey ceremony started: {custodians} new custodians ({}), threshold {}; waiting for their passphrases",
                holders.join(", "),
                threshold.max(1)
            ));
            *slot = Some(ceremony);
            Ok((status, Changes::none()))
         }))
        .await
    }

    /// One active identity per new share, all different, none the caller: the key admin who
    /// starts a ceremony never sets a new custodian's passphrase.
    async fn check_holders(
        &self,
        caller: &Caller,
        custodians: u8,
        holders: &[String],
    ) -> Result<(), VaultError> {
        if holders.len() != custodians as usize {
            return Err(VaultError::InvalidArgument(format!(
                "name the identity that will hold each new share: {custodians} custodians, {} named",
                holders.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for holder in holders {
            if holder == &caller.identity.name {
                return Err(VaultError::InvalidArgument(
                    "the key admin who starts a rekey cannot hold a new share (dual control)".into(),
                ));
            }
            if !seen.insert(holder.as_str()) {
                return Err(VaultError::InvalidArgument(format!(
                    "'{}' is named for two shares: each new share needs its own holder",
                    clean(holder)
                )));
            }
            match self.store.get_identity(holder).await? {
                Some(i) if i.revoked_ms.is_none() => {}
                _ => {
                    return Err(VaultError::InvalidArgument(format!(
                        "'{}' is not an active identity: create it first",
                        clean(holder)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Abandons the ceremony in progress; nothing had changed.
    pub async fn cancel_rekey(&self, caller: &Caller) -> Result<RekeyStatus, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::RekeyCancel, Operation::KeyAdmin, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                self.permit(regs, caller, Operation::KeyAdmin, e)?;
                let mut slot = self.rekey.lock().await;
                let ceremony = slot.take().ok_or_else(no_ceremony)?;
                e.reason = format!("rekey ceremony started by '{}' cancelled", ceremony.started_by);
                Ok((ceremony.status(approvals_needed(&self.store.custody().await?)), Changes::none()))
            }),
        )
        .await
    }

    /// The ceremony's progress for the seal status (never its nonce).
    pub(crate) async fn rekey_progress(&self) -> Result<Option<RekeyStatus>, VaultError> {
        let slot = self.rekey.lock().await;
        match slot.as_ref().filter(|c| now_ms() < c.expires_ms) {
            Some(c) => Ok(Some(c.status(approvals_needed(&self.store.custody().await?)))),
            None => Ok(None),
        }
    }

    /// New custodian `custodian` seals their share under their own passphrase. Slow on purpose
    /// (Argon2id): call it off the async runtime. Audited as `new-custodian-N`.
    #[allow(clippy::too_many_arguments)]
    pub async fn rekey_passphrase(
        &self,
        nonce: &str,
        custodian: u8,
        passphrase: &[u8],
        holder: &str,
        peer: Option<SocketAddr>,
        request_id: &str,
        client_request_id: &str,
    ) -> Result<RekeyStatus, VaultError> {
        let mut entry = custodian_entry(
            Rpc::RekeyPassphrase,
            format!("new-custodian-{custodian}"),
            &self.regulations(),
            peer,
            request_id,
            client_request_id,
        );
        let needed = approvals_needed(&self.store.custody().await?);
        let mut slot = self.rekey.lock().await;
        let sealed = (|| {
            let ceremony = slot.as_mut().filter(|c| now_ms() < c.expires_ms).ok_or_else(no_ceremony)?;
            if !ceremony.nonce_matches(nonce) {
                return Err(VaultError::PermissionDenied("wrong rekey nonce".into()));
            }
            let index = (custodian as usize)
                .checked_sub(1)
                .filter(|i| *i < ceremony.sealed.len())
                .ok_or_else(|| {
                    VaultError::InvalidArgument(format!(
                        "new custodian {custodian} does not exist (the new custodians are 1 to {})",
                        ceremony.custodians
                    ))
                })?;
            if ceremony.holders[index] != holder {
                return Err(VaultError::PermissionDenied(format!(
                    "new custodian {custodian}'s share is bound to another identity; only it can set this passphrase"
                )));
            }
            if ceremony.sealed[index].is_some() {
                return Err(VaultError::FailedPrecondition(format!(
                    "new custodian {custodian} already set their passphrase; if that was not them, cancel the ceremony"
                )));
            }
            check_new_passphrase(passphrase)?;
            // (No check that two holders chose the same passphrase: the refusal would tell the
            // second holder the first one's.)
            let _slot = self.derivations.enter()?;
            let sealed = match &ceremony.shares[index] {
                Some(share) => seal_share(share, passphrase, self.seal_params(), &self.rng)?,
                None => seal_root_key(&ceremony.root, passphrase, self.seal_params(), &self.rng)?,
            };
            Ok((index, sealed))
        })();
        match &sealed {
            Ok(_) => {
                entry.reason = clean(&format!("new custodian {custodian} ('{holder}') set their passphrase"))
            }
            Err(e) => {
                entry.outcome = e.outcome();
                entry.reason = clean(&e.to_string());
            }
        }
        // Audited before it counts: an unauditable step is not taken.
        self.commit_custodian(entry).await?;
        let (index, sealed) = sealed?;
        let ceremony = slot.as_mut().ok_or_else(no_ceremony)?;
        ceremony.sealed[index] = Some(sealed);
        ceremony.shares[index] = None;
        Ok(ceremony.status(needed))
    }

    /// Current custodian `custodian` approves with their current passphrase; the approval that
    /// reaches the current threshold replaces the root key. Slow on purpose: off the runtime.
    #[allow(clippy::too_many_arguments)]
    pub async fn rekey_approve(
        &self,
        nonce: &str,
        custodian: u8,
        passphrase: &[u8],
        peer: Option<SocketAddr>,
        request_id: &str,
        client_request_id: &str,
    ) -> Result<RekeyStatus, VaultError> {
        let mut entry = custodian_entry(
            Rpc::RekeyApprove,
            format!("custodian-{custodian}"),
            &self.regulations(),
            peer,
            request_id,
            client_request_id,
        );
        let custody = self.store.custody().await?;
        let needed = approvals_needed(&custody);
        let mut slot = self.rekey.lock().await;
        let step = async {
            self.unsealed()?;
            let ceremony = slot.as_mut().filter(|c| now_ms() < c.expires_ms).ok_or_else(no_ceremony)?;
            if !ceremony.nonce_matches(nonce) {
                return Err(VaultError::PermissionDenied("wrong rekey nonce".into()));
            }
            let missing = ceremony.missing();
            if !missing.is_empty() {
                return Err(VaultError::FailedPrecondition(format!(
                    "new custodians {} have not set their passphrases yet; approve once every new share is sealed",
                    missing.join(", ")
                )));
            }
            // The current root key, proven by this approval (with the others before it).
            let proven: Option<RootKey> = match &custody {
                Custody::Single { sealed_root } => {
                    if custodian != 1 {
                        return Err(VaultError::InvalidArgument(
                            "this vault has a single custodian, number 1".into(),
                        ));
                    }
                    Some(self.passphrase_check(custodian, peer.map(|p| p.ip()), || unseal_root_key(sealed_root, passphrase)).await?)
                }
                Custody::Shares { threshold, sealed } => {
                    let stored =
                        (custodian as usize).checked_sub(1).and_then(|i| sealed.get(i)).ok_or_else(|| {
                            VaultError::InvalidArgument(format!(
                                "custodian {custodian} does not exist (custodians are 1 to {})",
                                sealed.len()
                            ))
                        })?;
                    let share = self.passphrase_check(custodian, peer.map(|p| p.ip()), || unseal_share(stored, passphrase)).await?;
                    ceremony.approvals.retain(|s| s.index() != share.index());
                    ceremony.approvals.push(share);
                    if ceremony.approvals.len() < *threshold as usize {
                        None
                    } else {
                        let shares: Vec<&KeyShare> = ceremony.approvals.iter().collect();
                        let root = combine_root_key(&shares);
                        Some(root.map_err(|_| VaultError::RootMismatch)?)
                    }
                }
            };
            let Some(current) = proven else { return Ok(None) };
            if !self.is_current_root(&current).await? {
                ceremony.approvals.clear();
                return Err(VaultError::RootMismatch);
            }
            Ok(Some(current))
        }
        .await;
        let ceremony_status = slot.as_ref().map(|c| c.status(needed));
        match &step {
            Ok(None) => {
                let got = ceremony_status.as_ref().map_or(0, |s| s.approved.len());
                entry.reason = format!("approval {got} of {needed} needed")
            }
            Ok(Some(_)) => {
                let c = slot.as_ref().ok_or_else(no_ceremony)?;
                entry.reason = format!(
                    "approval {needed} of {needed}: root key replaced; {} custodians, threshold {}",
                    c.custodians, c.threshold
                )
            }
            Err(e) => {
                entry.outcome = e.outcome();
                entry.reason = clean(&e.to_string());
            }
        }
        self.commit_custodian(entry).await?;
        if step?.is_none() {
            return ceremony_status.ok_or_else(no_ceremony);
        }
        let ceremony = slot.take().ok_or_else(no_ceremony)?;
        self.replace_root_with(ceremony, needed).await
    }

    /// Whether `root` is the root key the vault runs under (it opens the stored derivation key,
    /// or for a vault from before derivation keys, every KEK).
    async fn is_current_root(&self, root: &RootKey) -> Result<bool, VaultError> {
        if let Some(wrapped) = self.store.derivation_key().await? {
            return Ok(root.unwrap_derivation_key(&wrapped).is_ok());
        }
        Ok(self.store.keks().await?.iter().all(|(_, w)| root.unwrap_kek(w).is_ok()))
    }

    /// Rewraps the derivation key and every KEK under the ceremony's root key and stores the
    /// new custody, all in one transaction; then serves under the new root key.
    async fn replace_root_with(&self, ceremony: Ceremony, needed: u8) -> Result<RekeyStatus, VaultError> {
        let keys = self.unsealed()?;
        let mut status = ceremony.status(needed);
        let sealed: Vec<Vec<u8>> = ceremony.sealed.into_iter().flatten().collect();
        let custody = if ceremony.custodians == 1 {
            let sealed_root = sealed.into_iter().next().ok_or_else(no_ceremony)?;
            Custody::Single { sealed_root }
        } else {
            Custody::Shares { threshold: ceremony.threshold, sealed }
        };
        let root = ceremony.root;
        let derivation = match self.store.derivation_key().await? {
            Some(wrapped) => keys.root.unwrap_derivation_key(&wrapped)?,
            None => keys.root.legacy_derivation_key()?,
        };
        let wrapped_derivation = root.wrap_derivation_key(&derivation, &self.rng)?;
        let keks = self
            .store
            .keks()
            .await?
            .into_iter()
            .map(|(version, wrapped)| {
                Ok((version, root.wrap_kek(&keys.root.unwrap_kek(&wrapped)?, &self.rng)?))
            })
            .collect::<Result<Vec<_>, KeyError>>()?;
        drop(keys);
        self.store.replace_root(&custody, &wrapped_derivation, &keks).await?;
        self.install_root(root).await?;
        tracing::warn!(
            custodians = status.custodians,
            threshold = status.threshold,
            "root key replaced by rekey"
        );
        status.approved.clear();
        status.done = true;
        Ok(status)
    }
}
