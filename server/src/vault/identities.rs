//! Creating identities under separation of duties: a role may assign only the roles its
//! regulations list in `assigns`, and an identity of a privileged role (one that reads, exports,
//! reads the audit log or administers) exists only once a second, distinct identity approved it
//! (two-person rule, PCI DSS 7.2 / 8.2). Requests wait in the store, expire, and every step is
//! audited like any request.

use std::time::Duration;

use khlang_keys::RandomSource;

use crate::audit::Rpc;
use crate::audit::{AuditEntry, Decided, clean};
use crate::clock::now_ms;
use crate::policy::Operation;
use crate::policy::regulations::{Regulations, Role};
use crate::storage::{Changes, StoredIdentityRequest};
use crate::vault::auth::IssuedToken;
use crate::vault::prepare;
use crate::{Caller, Vault, VaultError};

/// How long a request waits for its approval by default.
pub const IDENTITY_REQUEST_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Requests that may wait at once: an administrator cannot fill the store with them.
pub const MAX_PENDING_REQUESTS: usize = 256;
const REQUEST_FORMAT: u8 = 1;

/// What `CreateIdentity` did.
#[derive(Debug)]
pub enum IdentityCreation {
    /// The identity exists; its first token, shown once.
    Created(IssuedToken),
    /// The role needs a second identity's approval; nothing exists yet.
    Pending(IdentityRequest),
}

/// A request to create an identity, as administrators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRequest {
    pub id: String,
    pub name: String,
    pub role: String,
    pub requested_by: String,
    pub requested_ms: u64,
    pub expires_ms: u64,
}

impl From<StoredIdentityRequest> for IdentityRequest {
    fn from(r: StoredIdentityRequest) -> Self {
        Self {
            id: r.id,
            name: r.name,
            role: r.role,
            requested_by: r.requested_by,
            requested_ms: r.requested_ms,
            expires_ms: r.expires_ms,
        }
    }
}

/// The caller's role may assign `role`, or `PermissionDenied` naming the rule (recorded in `e`).
fn may_assign<'r>(
    regs: &'r Regulations,
    caller: &Caller,
    role: &str,
    e: &mut AuditEntry,
) -> Result<&'r Role, VaultError> {
    let Some(target) = regs.roles.get(role) else {
        return Err(VaultError::InvalidArgument(format!(
            "role '{}' is not in the regulations in force",
            clean(role)
        )));
    };
    let mine = &caller.identity.role;
    if !regs.roles.get(mine).is_some_and(|r| r.assigns.contains(role)) {
        e.decision = Decided::Deny;
        e.rule = format!("roles.{mine}.assigns");
        return Err(VaultError::PermissionDenied(format!(
            "role '{mine}' may not assign role '{role}' (roles.{mine}.assigns)"
        )));
    }
    e.rule = format!("roles.{mine}.assigns");
    Ok(target)
}

fn expired(r: &StoredIdentityRequest, now: u64) -> bool {
    now >= r.expires_ms
}

impl Vault {
    /// Creates an identity of a role the caller's role may assign; for a privileged role files a
    /// request for a second identity to approve instead.
    pub async fn create_identity(
        &self,
        caller: &Caller,
        name: &str,
        role: &str,
    ) -> Result<IdentityCreation, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::CreateIdentity, Operation::IdentityAdmin, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                e.reason = format!("identity '{}' with role '{}'", clean(name), clean(role));
                self.permit(regs, caller, Operation::IdentityAdmin, e)?;
                crate::vault::auth::check_identity_name(name)?;
                let target = may_assign(regs, caller, role, e)?;
                if !target.needs_approval() {
                    let (token, changes) =
                        self.stage_identity(regs, name, role, &caller.identity.name).await?;
                    return Ok((IdentityCreation::Created(token), changes));
                }
                if self.store.get_identity(name).await?.is_some() {
                    return Err(VaultError::AlreadyExists(format!("identity '{name}' already exists")));
                }
                let now = now_ms();
                let waiting: Vec<StoredIdentityRequest> = self
                    .store
                    .list_identity_requests()
                    .await?
                    .into_iter()
                    .filter(|r| !expired(r, now))
                    .collect();
                if let Some(other) = waiting.iter().find(|r| r.name == name) {
                    return Err(VaultError::AlreadyExists(format!(
                        "a request for identity '{name}' is already waiting for approval (request {})",
                        other.id
                    )));
                }
                if waiting.len() >= MAX_PENDING_REQUESTS {
                    return Err(VaultError::LimitExceeded(format!(
                        "{MAX_PENDING_REQUESTS} identity requests are waiting; approve or refuse some first"
                    )));
                }
                let mut id = [0u8; 16];
                self.rng.fill(&mut id)?;
                let ttl = u64::try_from(self.identity_request_ttl.as_millis()).unwrap_or(u64::MAX);
                let request = StoredIdentityRequest {
                    format: REQUEST_FORMAT,
                    id: hex::encode(id),
                    name: name.to_owned(),
                    role: role.to_owned(),
                    requested_by: caller.identity.name.clone(),
                    requested_ms: now,
                    expires_ms: now.saturating_add(ttl),
                    auth: None,
                };
                let mut changes = Changes::new();
                changes.add_identity_request(&request);
                e.reason = format!(
                    "identity '{name}' with role '{role}': request {} waits for a second identity's approval",
                    request.id
                );
                Ok((IdentityCreation::Pending(request.into()), changes))
            }),
        )
        .await
    }

    /// A second identity approves a request: the identity is created and its first token
    /// returned to the approver (the requester never holds it). Nobody approves their own
    /// request; the approver's role must itself assign the role.
    pub async fn approve_identity(
        &self,
        caller: &Caller,
        request_id: &str,
    ) -> Result<IssuedToken, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::ApproveIdentity, Operation::IdentityAdmin, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                e.reason = format!("request '{}'", clean(request_id));
                self.permit(regs, caller, Operation::IdentityAdmin, e)?;
                let request = self.open_request(request_id).await?;
                e.reason = format!(
                    "request {}: identity '{}' with role '{}', requested by '{}'",
                    request.id, request.name, request.role, request.requested_by
                );
                if request.requested_by == caller.identity.name {
                    e.decision = Decided::Deny;
                    e.rule = "two-person-rule".into();
                    return Err(VaultError::PermissionDenied(
                        "nobody approves their own request: a second identity must approve it".into(),
                    ));
                }
                may_assign(regs, caller, &request.role, e)?;
                let requester = self.active_requester(&request).await?;
                let created_by = format!("{} (approved by {})", request.requested_by, caller.identity.name);
                let (token, mut changes) =
                    self.stage_identity(regs, &request.name, &request.role, &created_by).await?;
                changes.close_identity_request(&request);
                changes.expect_identity(&requester);
                Ok((token, changes))
            }),
        )
        .await
    }

    /// Refuses (or, by its requester, withdraws) a request; nothing is created.
    pub async fn refuse_identity(
        &self,
        caller: &Caller,
        request_id: &str,
        why: &str,
    ) -> Result<(), VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::RefuseIdentity, Operation::IdentityAdmin, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                e.reason = format!("request '{}'", clean(request_id));
                self.permit(regs, caller, Operation::IdentityAdmin, e)?;
                let Some(request) = self.store.get_identity_request(request_id).await? else {
                    return Err(VaultError::NotFound("identity request"));
                };
                if request.requested_by != caller.identity.name {
                    may_assign(regs, caller, &request.role, e)?;
                }
                let why: String = clean(why).chars().take(200).collect();
                e.reason = format!(
                    "request {}: identity '{}' with role '{}', requested by '{}', refused: {why}",
                    request.id, request.name, request.role, request.requested_by
                );
                let mut changes = Changes::new();
                changes.close_identity_request(&request);
                Ok(((), changes))
            }),
        )
        .await
    }

    /// Requests waiting for approval (expired ones are left out).
    pub async fn identity_requests(&self, caller: &Caller) -> Result<Vec<IdentityRequest>, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::ListIdentityRequests, Operation::IdentityAdmin, &regs);
        let regs = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                self.permit(regs, caller, Operation::IdentityAdmin, e)?;
                let now = now_ms();
                let list = self
                    .store
                    .list_identity_requests()
                    .await?
                    .into_iter()
                    .filter(|r| !expired(r, now))
                    .map(IdentityRequest::from)
                    .collect();
                Ok((list, Changes::none()))
            }),
        )
        .await
    }

    /// The requester of `request`, who must still be active: a revoked administrator's requests
    /// die with them.
    pub(crate) async fn active_requester(
        &self,
        request: &StoredIdentityRequest,
    ) -> Result<crate::storage::StoredIdentity, VaultError> {
        self.store.get_identity(&request.requested_by).await?.filter(|i| i.revoked_ms.is_none()).ok_or_else(
            || {
                VaultError::FailedPrecondition(format!(
                    "the requester '{}' was revoked; the request cannot be approved",
                    request.requested_by
                ))
            },
        )
    }

    /// A request that can still be approved.
    pub(crate) async fn open_request(&self, request_id: &str) -> Result<StoredIdentityRequest, VaultError> {
        let request = self
            .store
            .get_identity_request(request_id)
            .await?
            .ok_or(VaultError::NotFound("identity request"))?;
        if expired(&request, now_ms()) {
            return Err(VaultError::FailedPrecondition(format!(
                "request {} expired; file a new one",
                request.id
            )));
        }
        Ok(request)
    }
}
