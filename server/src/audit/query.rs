//! Reading the log back: officers' filters, parsed entries, export and archive lines.

use super::*;

/// What a security officer asks the log for; every given filter must match.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    pub identity: Option<String>,
    pub role: Option<String>,
    /// The subject's blind index (hex), resolved by the vault from the subject id.
    pub subject: Option<String>,
    pub record_id: Option<String>,
    pub operation: Option<String>,
    pub decision: Option<String>,
    pub purpose: Option<String>,
    pub limit: Option<usize>,
}

impl AuditFilter {
    pub fn matches(&self, e: &AuditEntry) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        self.from_ms.is_none_or(|f| e.time_ms >= f)
            && self.to_ms.is_none_or(|t| e.time_ms <= t)
            && eq(&self.identity, &e.identity)
            && eq(&self.role, &e.role)
            && eq(&self.subject, &e.subject)
            && eq(&self.record_id, &e.record_id)
            && eq(&self.operation, &e.operation)
            && eq(&self.decision, e.decision.as_str())
            && eq(&self.purpose, &e.purpose)
    }

    /// A short description for the audit entry of the query itself.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut add = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{k}={}", clean(v)));
            }
        };
        add("identity", &self.identity);
        add("role", &self.role);
        add("subject", &self.subject);
        add("record", &self.record_id);
        add("operation", &self.operation);
        add("decision", &self.decision);
        add("purpose", &self.purpose);
        if let Some(f) = self.from_ms {
            parts.push(format!("from_ms={f}"));
        }
        if let Some(t) = self.to_ms {
            parts.push(format!("to_ms={t}"));
        }
        parts.join(" ")
    }
}

/// Reads entries back, oldest first, parsed. A damaged line is not an entry: it is left out here
/// (verification names it), so the rest of the log stays readable.
pub fn read_entries(files: &dyn AuditFiles) -> impl Iterator<Item = Result<AuditEntry, StoreError>> + '_ {
    files.entries(0).filter_map(|item| match item {
        Ok((_, value)) => {
            let (_, json) = split_stored(&value).ok()?;
            serde_json::from_slice(json).ok().map(Ok)
        }
        Err(e) => Some(Err(e)),
    })
}

/// The archive of entries up to `last`: the export format (a header, each entry with its chain
/// hash, the checkpoints up to `last`, including the one anchoring its first entry).
pub fn archive_lines(
    files: &dyn AuditFiles,
    public_key: Vec<u8>,
    last: u64,
) -> impl Iterator<Item = Result<String, StoreError>> + '_ {
    lines_up_to(files, public_key, last)
}

/// The export format, JSON Lines: a header, every entry with its chain hash, every checkpoint.
pub fn export_lines(
    files: &dyn AuditFiles,
    public_key: Vec<u8>,
) -> impl Iterator<Item = Result<String, StoreError>> + '_ {
    lines_up_to(files, public_key, u64::MAX)
}

/// Export lines of the entries and checkpoints up to seq `last`.
pub(crate) fn lines_up_to(
    files: &dyn AuditFiles,
    public_key: Vec<u8>,
    last: u64,
) -> impl Iterator<Item = Result<String, StoreError>> + '_ {
    let header = serde_json::json!({"type": "header", "format": "khlang-audit-2", "public_key": hex::encode(&public_key)});
    let entries = files
        .entries(0)
        .take_while(move |item| item.as_ref().map_or(true, |(seq, _)| *seq <= last))
        .map(|item| {
            let (seq, value) = item?;
            // A damaged line goes out as what it is, so an offline verifier names it too.
            let damaged = format!(r#"{{"type":"damaged","seq":{seq}}}"#);
            let Ok((hash, json)) = split_stored(&value) else { return Ok(damaged) };
            match std::str::from_utf8(json)
                .ok()
                .filter(|j| serde_json::from_str::<serde_json::Value>(j).is_ok())
            {
                Some(json) => Ok(format!(
                    r#"{{"type":"entry","seq":{seq},"hash":"{}","entry":{json}}}"#,
                    hex::encode(hash)
                )),
                None => Ok(damaged),
            }
        });
    let checkpoints = files.checkpoints().map(|cps| {
        cps.into_iter().filter_map(move |c| {
            let line = || -> Result<Option<String>, StoreError> {
                let cp: StoredCheckpoint =
                    serde_json::from_slice(&c).map_err(|_| StoreError::Corrupt("checkpoint"))?;
                if cp.seq > last {
                    return Ok(None);
                }
                let mut v = serde_json::to_value(&cp).map_err(|_| StoreError::Corrupt("checkpoint"))?;
                v["type"] = "checkpoint".into();
                Ok(Some(v.to_string()))
            };
            line().transpose()
        })
    });
    let checkpoints: Box<dyn Iterator<Item = Result<String, StoreError>>> = match checkpoints {
        Ok(it) => Box::new(it.collect::<Vec<_>>().into_iter()),
        Err(e) => Box::new(std::iter::once(Err(e))),
    };
    std::iter::once(Ok(header.to_string())).chain(entries).chain(checkpoints)
}
