//! What a change set writes and what it counts on, by stored thing, so a group commit can tell
//! whether a member counts on something an earlier member of the same group writes (then it is
//! sent back to prepare again, as if it had committed alone after that member).

use super::{Expect, Op};

/// One stored thing an expectation can name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Touch {
    /// A record and its data key (they change together or under the same record's expectation).
    Record(String),
    Identity(String),
    IdentityRequest(String),
    Regulations,
    Job,
}

impl Op {
    /// What this operation writes that some expectation can name (`None`: nothing can).
    pub fn touches(&self) -> Option<Touch> {
        Some(match self {
            Op::InsertRecord { id, .. }
            | Op::ReplaceRecord { id, .. }
            | Op::ReplaceDataKey { id, .. }
            | Op::DeleteRecord { id, .. } => Touch::Record(id.clone()),
            Op::PutIdentity(identity) => Touch::Identity(identity.name.clone()),
            Op::PutIdentityRequest(request) => Touch::IdentityRequest(request.id.clone()),
            Op::RemoveIdentityRequest(id) => Touch::IdentityRequest(id.clone()),
            Op::PutRegulations(_) | Op::RetagRegulations(_) => Touch::Regulations,
            Op::PutJob(_) => Touch::Job,
            _ => return None,
        })
    }
}

impl Expect {
    /// What this expectation counts on (`None`: nothing another member's operations change —
    /// a KEK's liveness changes outside change sets, the chain head is the group's own).
    pub fn touches(&self) -> Option<Touch> {
        Some(match self {
            Expect::Record { id, .. } | Expect::DataKey { id, .. } | Expect::DataKeyIs { id, .. } => {
                Touch::Record(id.clone())
            }
            Expect::Identity { name, .. } => Touch::Identity(name.clone()),
            Expect::IdentityRequest { id, .. } => Touch::IdentityRequest(id.clone()),
            Expect::Regulations(_) => Touch::Regulations,
            Expect::Job(_) => Touch::Job,
            Expect::KekLive(_) | Expect::AuditHead(_) => return None,
        })
    }
}
