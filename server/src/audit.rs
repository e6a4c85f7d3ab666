//! The audit step. Every request that reaches the vault produces one event *before* it executes;
//! if the sink fails, the request fails. Events name fields, never their values.
//!
//! The sink here writes structured lines to the `khlang::audit` tracing target; the tamper-evident
//! store replaces it behind the same trait.

use std::net::SocketAddr;

use crate::VaultError;

#[derive(Debug, Clone)]
pub struct AuditEvent<'a> {
    pub request_id: &'a str,
    pub identity: &'a str,
    pub role: &'a str,
    pub peer: Option<SocketAddr>,
    pub operation: &'static str,
    pub record_id: Option<&'a str>,
    pub fields: &'a [&'a str],
    pub purpose: Option<&'a str>,
    /// "allow" or "deny".
    pub decision: &'static str,
    pub rule: &'a str,
    /// SHA-256 of the regulations that made the decision.
    pub regulations_version: &'a str,
}

pub trait AuditSink: Send + Sync {
    fn record(&self, event: &AuditEvent<'_>) -> Result<(), VaultError>;
}

/// Writes each event as one structured log line.
#[derive(Debug, Default)]
pub struct TracingAudit;

impl AuditSink for TracingAudit {
    fn record(&self, e: &AuditEvent<'_>) -> Result<(), VaultError> {
        tracing::info!(
            target: "khlang::audit",
            request_id = e.request_id,
            identity = e.identity,
            role = e.role,
            peer = ?e.peer,
            operation = e.operation,
            record_id = e.record_id.unwrap_or(""),
            fields = ?e.fields,
            purpose = e.purpose.unwrap_or(""),
            decision = e.decision,
            rule = e.rule,
            regulations = e.regulations_version,
        );
        Ok(())
    }
}
