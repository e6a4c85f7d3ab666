//! Every name an audit entry's `rpc` can hold: the API's methods (the gRPC method names, checked
//! against the compiled protos) and the vault's own events. The single source of these names:
//! the wire layer, the pipeline and the log all take an [`Rpc`], never a string.

macro_rules! rpcs {
    (api: $($api:ident),* ; events: $($event:ident = $name:literal),* $(,)?) => {
        /// A gRPC method of the API, or an event the vault records on its own.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Rpc {
            $($api,)*
            $($event,)*
        }

        impl Rpc {
            /// The API's methods, as the protos name them.
            pub const API: &[Rpc] = &[$(Rpc::$api),*];
            /// Entries the vault writes without a call: its own events.
            pub const EVENTS: &[Rpc] = &[$(Rpc::$event),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Rpc::$api => stringify!($api),)*
                    $(Rpc::$event => $name,)*
                }
            }

            /// The name as the server spells it, static (a metrics label without an allocation
            /// per request); `other` for a name no RPC or event has.
            pub fn static_name(name: &str) -> &'static str {
                Self::API.iter().chain(Self::EVENTS).map(|r| r.as_str()).find(|n| *n == name).unwrap_or("other")
            }

            /// The method a request path's last segment names; `None` for one the API lacks.
            pub fn api_method(name: &str) -> Option<Self> {
                Self::API.iter().copied().find(|r| r.as_str() == name)
            }
        }
    };
}

rpcs! {
    api: PutRecord, PutRecords, GetRecord, UpdateRecord, DeleteRecord, ListRecords, SetConsent, GetConsent,
        ExportSubject, EraseSubject, CreateIdentity, ApproveIdentity, RefuseIdentity,
        ListIdentityRequests, ListIdentities, RevokeIdentity, ReloadRegulations, GetRegulations,
        QueryAudit, ExportAudit, VerifyAudit, AuditPublicKey, SealStatus, Unseal, Seal,
        ChangePassphrase, Rekey, RekeyPassphrase, RekeyApprove, RekeyCancel, RotateKey, KeyStatus,
        RetireKey, Reencrypt, Backup;
    events: IssueToken = "IssueToken", KeyJob = "KeyJob",
        Sighup = "SIGHUP", ArchiveAudit = "ArchiveAudit", AuditBreak = "AuditBreak",
        AcceptAuditBreak = "AcceptAuditBreak", AuditUnproven = "AuditUnproven",
        VerifyVault = "VerifyVault", AuthenticateAuthority = "AuthenticateAuthority",
        FirstRegulations = "FirstRegulations", AuthorityAlarm = "AuthorityAlarm",
}

impl std::fmt::Display for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Rpc;

    /// The enum and the protos name the same methods, so no handler or entry can name one the API
    /// does not have, and none of the API's methods lacks a name here.
    #[test]
    fn the_api_names_are_the_protos_methods() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(khlang_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut in_protos: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| f.service.iter())
            .flat_map(|s| s.method.iter())
            .filter_map(|m| m.name.clone())
            .collect();
        in_protos.sort();
        let mut here: Vec<String> = Rpc::API.iter().map(|r| r.as_str().to_owned()).collect();
        here.sort();
        assert_eq!(here, in_protos);
        assert_eq!(Rpc::AuditBreak.as_str(), khlang_keys::audit_chain::AUDIT_BREAK_RPC);
        assert!(Rpc::EVENTS.iter().all(|e| Rpc::api_method(e.as_str()).is_none()));
    }
}
