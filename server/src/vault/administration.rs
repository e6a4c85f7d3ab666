//! Administration: identities listed and revoked, the regulations shown and reloaded.

use super::*;

impl Vault {
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

    pub(crate) fn info(regs: &Regulations) -> RegulationsInfo {
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
