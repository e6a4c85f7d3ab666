//! The decide step: role × operation × fields × purpose → allow or deny. Deny by default.
//!
//! Until the regulations file is loaded, the only role with data access is `developer` (the
//! development identity); every other role is refused.

use crate::{Identity, VaultError};

/// What a request does, as the regulations name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Write,
    Read,
    Update,
    Delete,
    List,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Read => "read",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::List => "list",
        }
    }
}

/// An allowed request, with the rule that allowed it (recorded in the audit trail).
#[derive(Debug, Clone)]
pub struct Decision {
    pub rule: &'static str,
}

/// The development role, which may do every record operation.
pub const DEVELOPER_ROLE: &str = "developer";

pub fn decide(
    identity: &Identity,
    op: Operation,
    _fields: &[&str],
    _purpose: Option<&str>,
) -> Result<Decision, VaultError> {
    if identity.role == DEVELOPER_ROLE {
        return Ok(Decision { rule: "developer-may-do-all" });
    }
    Err(VaultError::PermissionDenied(format!(
        "role '{}' may not {} records (deny by default)",
        identity.role,
        op.as_str()
    )))
}
