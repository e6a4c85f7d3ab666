//! Break-glass for the two-person rule. A privileged identity is created only when a second
//! administrator approves the first one's request; if only one administrator is left (the others
//! left, or were revoked), nobody can ever approve again and the organisation is locked out of its
//! own vault. The custodians' quorum, which already guards the root key, stands in for the second
//! person: `khlangd approve-identity` opens the stopped vault with K custodians' passphrases and
//! approves a pending request, only when no active identity other than the requester could
//! approve it. Audited as `ApproveIdentity` by `custodians`.

use super::*;

/// Who the audit entry names as the approver.
pub const CUSTODIANS_APPROVER: &str = "custodians";

impl Vault {
    /// Approves `request_id` for the custodians' quorum that unsealed this process (the operator's
    /// offline command gives their passphrases), when the two-person rule cannot be met otherwise.
    pub async fn approve_identity_by_custodians(
        &self,
        request_id: &str,
    ) -> Result<(String, IssuedToken), VaultError> {
        let regs = self.regulations();
        let mut entry = operator_entry(Rpc::ApproveIdentity, Operation::IdentityAdmin, &regs);
        entry.identity = CUSTODIANS_APPROVER.into();
        let staged = async {
            self.unsealed()?;
            let request = self.open_request(request_id).await?;
            entry.reason = clean(&format!(
                "break-glass: request {}: identity '{}' with role '{}', requested by '{}'",
                request.id, request.name, request.role, request.requested_by
            ));
            let requester = self.active_requester(&request).await?;
            // Only when nobody else could approve it: no active identity but the requester whose
            // role may administer identities and assign the requested role.
            let approvers: Vec<String> = self
                .store
                .list_identities()
                .await?
                .into_iter()
                .filter(|i| i.revoked_ms.is_none() && i.name != request.requested_by)
                .filter(|i| {
                    let who = Identity { name: i.name.clone(), role: i.role.clone() };
                    let ask = Ask { op: Operation::IdentityAdmin, fields: &[], purpose: None, consent: None };
                    policy::decide(&regs, &who, ask).is_ok()
                        && regs.roles.get(&i.role).is_some_and(|r| r.assigns.contains(&request.role))
                })
                .map(|i| i.name)
                .collect();
            if let Some(other) = approvers.first() {
                return Err(VaultError::FailedPrecondition(format!(
                    "'{}' can approve this request: break-glass is only for when nobody else can",
                    clean(other)
                )));
            }
            let created_by = format!("{} (approved by the custodians, break-glass)", request.requested_by);
            let (token, mut changes) =
                self.stage_identity(&regs, &request.name, &request.role, &created_by).await?;
            changes.close_identity_request(&request);
            changes.expect_identity(&requester);
            Ok((request.name, token, changes))
        }
        .await;
        match staged {
            Ok((name, token, changes)) => {
                self.commit_now(entry, changes).await?;
                tracing::warn!(identity = %name, "break-glass: an identity request approved by the custodians");
                Ok((name, token))
            }
            Err(e) => {
                entry.outcome = e.outcome();
                entry.reason = clean(&format!("break-glass refused: {e}"));
                self.commit_now(entry, Changes::none()).await?;
                Err(e)
            }
        }
    }
}
