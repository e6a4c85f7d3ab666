//! What nodes sharing one store (PostgreSQL) keep alike: the regulations in force, stored with
//! every earlier version's text so all nodes decide under the same one; the KEK versions (see
//! [`Vault::follow_keks`]); and lockouts (failures are counted in the store, see
//! [`Vault::count_failure`]). Each node follows the store every [`FOLLOW_EVERY`]: a reload,
//! rotation or lockout on one node holds on the others within that and a query.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::policy::regulations::Regulations;
use crate::storage::{Changes, Storage, StoredRegulations};
use crate::vault::now_ms;
use crate::{Vault, VaultError, VaultOptions};

/// How often a node on a shared store looks for what another node changed.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// Format of [`StoredRegulations`] this build writes.
const REGULATIONS_FORMAT: u8 = 1;

/// The regulations a vault starts under, their serial, and whether to reload the file once
/// unsealed. The store's are in force (its data folder's on sled, the database's for every node
/// on PostgreSQL): a vault given no file takes them; one given a file whose text differs is
/// refused (serving other rules than it was under, or than its peers, without saying so), with
/// both versions named — unless `--regulations-changed` says so, and then the file is put in
/// force by an audited reload once unsealed. A store that holds none yet gets the given ones
/// as its first version at the first unseal ([`Vault::store_first_regulations`]).
pub(crate) async fn regulations_at_start(
    store: &dyn Storage,
    options: &VaultOptions,
) -> Result<(Arc<Regulations>, u64, bool), VaultError> {
    let Some(stored) = store.regulations().await? else {
        // None stored yet: they are stored (tagged and audited) at the first unseal, the first
        // moment the vault can authenticate them; until then they are in force in memory.
        return Ok((options.regulations.clone(), 0, false));
    };
    let in_force = parse_stored(&stored)?;
    let differs = in_force.version != options.regulations.version;
    if let Some(path) = &options.regulations_path
        && differs
        && !options.regulations_changed
    {
        return Err(VaultError::FailedPrecondition(format!(
            "the vault's regulations in force are version {} (serial {}, put in force by {}); \
             {} is version {}: start with the same file (or without --regulations, to take \
             the vault's), or say the file replaces them with --regulations-changed (it is \
             put in force, audited, once the vault is unsealed)",
            in_force.version,
            stored.serial,
            crate::audit::clean(&stored.loaded_by),
            path.display(),
            options.regulations.version
        )));
    }
    let reload = differs && options.regulations_path.is_some() && options.regulations_changed;
    Ok((Arc::new(in_force), stored.serial, reload))
}

fn parse_stored(stored: &StoredRegulations) -> Result<Regulations, VaultError> {
    Regulations::parse(&stored.text).map_err(|e| {
        tracing::error!(serial = stored.serial, error = %e, "the database's regulations do not parse");
        VaultError::Storage(crate::StoreError::Corrupt("regulations"))
    })
}

impl Vault {
    /// The change that puts `next` in force (stored beside every earlier version), applied only
    /// if no other node put a version in force meanwhile.
    pub(crate) async fn regulations_change(
        &self,
        next: &Regulations,
        by: &str,
    ) -> Result<(Changes, u64), VaultError> {
        let serial = self.store.regulations_serial().await?.unwrap_or(0) + 1;
        let mut changes = Changes::new();
        changes.put_regulations(&StoredRegulations {
            format: REGULATIONS_FORMAT,
            serial,
            text: next.text.to_string(),
            loaded_ms: now_ms(),
            loaded_by: by.to_owned(),
            auth: None,
        });
        Ok((changes, serial))
    }

    /// At unseal, when the store holds no regulations yet: stores those in force as version 1,
    /// audited. Another node storing its own first at the same moment wins; this one follows it.
    pub(crate) async fn store_first_regulations(&self) -> Result<(), VaultError> {
        if self.store.regulations_serial().await?.is_some() {
            return Ok(());
        }
        let regs = self.regulations();
        let (changes, serial) = self.regulations_change(&regs, "operator").await?;
        let mut entry = crate::vault::operator_entry(
            crate::audit::Rpc::FirstRegulations,
            crate::policy::Operation::RegulationsAdmin,
            &regs,
        );
        entry.reason =
            format!("regulations version {} stored as the vault's first (serial {serial})", regs.version);
        match self.commit_now(entry, changes).await {
            Ok(()) => {
                self.install_regulations((*regs).clone(), serial);
                tracing::info!(version = %regs.version, "regulations stored as the vault's first version");
                Ok(())
            }
            Err(VaultError::FailedPrecondition(_)) => self.follow_regulations().await.map(|_| ()),
            Err(e) => Err(e),
        }
    }

    /// Puts the regulations another node put in force in force here too. `Ok(true)`: changed.
    pub(crate) async fn follow_regulations(&self) -> Result<bool, VaultError> {
        let Some(serial) = self.store.regulations_serial().await? else { return Ok(false) };
        if serial <= self.regulations_serial() {
            return Ok(false);
        }
        let stored = match self.store.regulations().await {
            Ok(Some(stored)) => stored,
            Ok(None) => return Ok(false),
            Err(e @ crate::StoreError::Unauthentic { .. }) => {
                // Regulations that appeared in the store without the audited change that makes
                // them: never in force; the log says so once per serial.
                let mut alarmed = self.alarmed_regulations.lock().await;
                if *alarmed < serial {
                    *alarmed = serial;
                    let regs = self.regulations();
                    let mut entry = crate::vault::operator_entry(
                        crate::audit::Rpc::AuthorityAlarm,
                        crate::policy::Operation::RegulationsAdmin,
                        &regs,
                    );
                    entry.identity = "vault".into();
                    entry.outcome = crate::Outcome::DataLoss;
                    entry.reason = crate::audit::clean(&format!("serial {serial} refused: {e}"));
                    self.commit_now(entry, Changes::none()).await?;
                }
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        let next = parse_stored(&stored)?;
        let version = next.version.clone();
        if self.install_regulations(next, stored.serial) {
            tracing::info!(
                %version,
                serial = stored.serial,
                by = %crate::audit::clean(&stored.loaded_by),
                "regulations put in force on another node; now in force here"
            );
            return Ok(true);
        }
        Ok(false)
    }
}

/// Follows what the other nodes sharing the store change (regulations, KEK versions) while the
/// vault lives.
pub(crate) async fn follow(vault: Weak<Vault>) {
    // Lockouts on a loop of their own: the steps below read the shared log and can outlast a tick
    // under load, and a credential locked on any node must be refused on every other within a
    // second. It ends with this task (dropped, it aborts the loop).
    let _lockouts = AbortOnDrop(tokio::spawn(follow_lockouts(vault.clone())));
    let mut tick = tokio::time::interval(FOLLOW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(vault) = vault.upgrade() else { return };
        // What other nodes wrote, read into the index of authority writes (a credential another
        // node revoked is refused here within a tick even if its cache was not told).
        if !vault.is_sealed()
            && let Err(e) =
                crate::storage::authority::catch_up(vault.unchecked.as_ref(), &vault.audit.authority_key())
                    .await
        {
            tracing::warn!(error = %e, "cannot read the shared audit chain's new entries; retrying");
        }
        // Stored regulations can be checked only with the unsealed vault's authority key.
        if !vault.is_sealed()
            && let Err(e) = vault.follow_regulations().await
        {
            tracing::warn!(error = %e, "cannot follow the shared store's regulations; retrying");
        }
        if let Err(e) = vault.follow_keks().await {
            tracing::warn!(error = %e, "cannot follow the shared store's KEK versions; retrying");
        }
    }
}

async fn follow_lockouts(vault: Weak<Vault>) {
    let mut tick = tokio::time::interval(FOLLOW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(vault) = vault.upgrade() else { return };
        if let Err(e) = vault.follow_lockouts().await {
            tracing::warn!(error = %e, "cannot follow the shared store's lockouts; retrying");
        }
    }
}

/// A task aborted when its owner is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
