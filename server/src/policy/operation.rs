//! The operations the regulations name.

/// What a request does, as the regulations name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operation {
    Write,
    Read,
    Update,
    Delete,
    List,
    Export,
    Erase,
    Consent,
    AuditRead,
    KeyAdmin,
    IdentityAdmin,
    RegulationsAdmin,
}

impl Operation {
    /// Operations that read, change or disclose personal data (refused while the audit log is
    /// broken), as opposed to the log's own reading and administration.
    pub fn touches_personal_data(self) -> bool {
        !matches!(self, Self::AuditRead | Self::KeyAdmin | Self::IdentityAdmin | Self::RegulationsAdmin)
    }

    /// Operations that may change what the store holds (reads, lists, exports and audit reads
    /// only append their audit entry to the log's files).
    pub fn may_write(self) -> bool {
        !matches!(self, Self::Read | Self::List | Self::Export | Self::AuditRead)
    }

    pub(crate) const ALL: &[Operation] = &[
        Self::Write,
        Self::Read,
        Self::Update,
        Self::Delete,
        Self::List,
        Self::Export,
        Self::Erase,
        Self::Consent,
        Self::AuditRead,
        Self::KeyAdmin,
        Self::IdentityAdmin,
        Self::RegulationsAdmin,
    ];
    /// The names the regulations file uses.
    pub const NAMES: &[&str] = &[
        "write",
        "read",
        "update",
        "delete",
        "list",
        "export",
        "erase",
        "consent",
        "audit_read",
        "key_admin",
        "identity_admin",
        "regulations_admin",
    ];

    pub fn as_str(self) -> &'static str {
        let i = Self::ALL.iter().position(|o| *o == self).unwrap_or(0);
        Self::NAMES[i]
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::NAMES.iter().position(|n| *n == s).map(|i| Self::ALL[i])
    }
}
