//! What the CLI prints: tables, one-line statuses, JSON, and times, all made safe for a terminal.

use super::*;

/// Whether tables show times in UTC (`--utc`) rather than the local zone.
pub(crate) static UTC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// A time for people: RFC 3339 to the second, in the local zone (or UTC with `--utc`); JSON
/// output keeps milliseconds.
pub(crate) fn when(ms: u64) -> String {
    use jiff::tz::TimeZone;
    if ms == 0 {
        return "-".into();
    }
    let Ok(t) = jiff::Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX)) else {
        return format!("{ms} ms");
    };
    let tz = if UTC.get().copied().unwrap_or(false) { TimeZone::UTC } else { TimeZone::system() };
    t.to_zoned_datetime(tz).strftime("%Y-%m-%dT%H:%M:%S%:z").to_string()
}

pub(crate) fn decision_name(d: cli::Decision) -> String {
    match d {
        cli::Decision::Allow => "allow",
        cli::Decision::Deny => "deny",
        cli::Decision::None => "none",
    }
    .to_owned()
}

pub(crate) fn print_seal(s: &SealStatus) {
    if s.sealed {
        let given = if s.received.is_empty() {
            "none yet".to_owned()
        } else {
            s.received.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        };
        outln!(
            "SEALED: {} of {} needed custodians' shares given (custodians: {given}; {} in all)",
            s.received.len(),
            s.threshold,
            s.custodians
        );
    } else {
        outln!("unsealed ({} of {} custodians unseal)", s.threshold, s.custodians);
    }
    if let Some(r) = &s.rekey {
        print_rekey(r);
    }
}

pub(crate) fn numbers(list: &[u32]) -> String {
    if list.is_empty() {
        "none yet".into()
    } else {
        list.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
    }
}

pub(crate) fn print_rekey(r: &RekeyStatus) {
    if r.done {
        outln!(
            "rekey done: a new root key, any {} of {} custodians unseal; the old shares no longer do",
            r.threshold,
            r.custodians
        );
        return;
    }
    outln!(
        "rekey in progress (started by {}): new split {} of {}; new passphrases set: {}; approvals: {} of {} needed: {}",
        terminal_safe(&r.started_by),
        r.threshold,
        r.custodians,
        numbers(&r.passphrases_set),
        r.approved.len(),
        r.approvals_needed,
        numbers(&r.approved)
    );
    for slot in &r.slots {
        outln!(
            "  new custodian {}: {} ({})",
            slot.custodian,
            terminal_safe(&slot.holder),
            if slot.set { "passphrase set" } else { "waiting" }
        );
    }
}

pub(crate) fn age(created_ms: u64) -> String {
    if created_ms == 0 {
        return "unknown".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(created_ms) / 1000;
    match secs {
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

pub(crate) fn job_line(k: &KeysStatus) -> Option<String> {
    let j = k.job.as_ref()?;
    let what =
        if j.kind == "rewrap" { format!("rewrap to v{}", j.target_version) } else { "re-encryption".into() };
    // Records written after the job began count as done too, so cap at 100%.
    let pct = if j.total == 0 { 100.0 } else { (100.0 * j.done() as f64 / j.total as f64).min(100.0) };
    let width = 30usize;
    let filled = ((pct / 100.0) * width as f64).round().min(width as f64) as usize;
    let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
    let state = match (j.finished_ms, j.eta_secs) {
        (Some(_), _) => format!("finished: {} changed, {} already current", j.changed, j.skipped),
        (None, Some(eta)) => format!("{:.0}/s  ETA {eta}s", j.rate_per_sec),
        (None, None) => format!("{:.0}/s", j.rate_per_sec),
    };
    Some(format!("{what:<16} [{bar}] {pct:5.1}%  {}/{}  {state}", j.done(), j.total))
}

pub(crate) fn print_keys(k: &KeysStatus) {
    outln!("{:>7}  {:<13} {:>6}  {:>12}  note", "version", "state", "age", "data keys");
    for v in &k.versions {
        let note = match (v.overdue, k.cryptoperiod_days) {
            (true, Some(d)) => format!("OVERDUE: older than the {d}-day cryptoperiod; rotate"),
            _ => String::new(),
        };
        let count = v.data_keys.map_or_else(|| "-".to_owned(), |n| n.to_string());
        outln!("{:>7}  {:<13} {:>6}  {count:>12}  {note}", v.version, v.state, age(v.created_ms));
    }
    if let Some(line) = job_line(k) {
        outln!("{line}");
    }
}

pub(crate) fn keys_json(k: &KeysStatus) -> serde_json::Value {
    let versions: Vec<_> = k
        .versions
        .iter()
        .map(|v| {
            serde_json::json!({"version": v.version, "state": v.state, "created_ms": v.created_ms,
                "retired_ms": v.retired_ms, "data_keys": v.data_keys, "overdue": v.overdue})
        })
        .collect();
    let job = k.job.as_ref().map(|j| {
        serde_json::json!({"kind": j.kind, "target_version": j.target_version, "changed": j.changed,
            "skipped": j.skipped, "total": j.total, "started_ms": j.started_ms, "finished_ms": j.finished_ms,
            "requested_by": j.requested_by, "rate_per_sec": j.rate_per_sec, "eta_secs": j.eta_secs})
    });
    serde_json::json!({"versions": versions, "job": job, "cryptoperiod_days": k.cryptoperiod_days})
}

pub(crate) fn record_json(r: &Record) -> serde_json::Value {
    let fields: serde_json::Map<String, serde_json::Value> = r
        .fields
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.expose_secret().to_owned())))
        .collect();
    serde_json::Value::Object(fields)
}

pub(crate) fn consent_json(c: &ConsentEntry) -> serde_json::Value {
    serde_json::json!({"purpose": c.purpose, "granted": c.granted, "at_ms": c.at_ms, "recorded_by": c.recorded_by})
}

pub(crate) fn audit_json(e: &AuditRecord) -> serde_json::Value {
    serde_json::json!({
        "seq": e.seq, "time_ms": e.time_ms, "rpc": e.rpc, "operation": e.operation, "identity": e.identity,
        "role": e.role, "peer": e.peer, "request_id": e.request_id, "subject": e.subject,
        "record_id": e.record_id, "fields": e.fields, "purpose": e.purpose, "decision": e.decision,
        "rule": e.rule, "reason": e.reason, "regulations_version": e.regulations_version,
        "key_versions": e.key_versions, "outcome": e.outcome,
    })
}

/// A caller's string made safe for a terminal: no control characters, bounded.
/// Text as it may reach a terminal: a stored value or log field could otherwise fake another line
/// (a newline) or reorder what is shown (bidi overrides). Newlines and tabs are escaped, other
/// control characters become `?`, and invisible formatting characters (zero-width, bidi controls,
/// BOM) are dropped.
pub(crate) fn terminal_safe(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}'
            | '\u{180e}' => {}
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

pub(crate) fn print_audit(entries: &[AuditRecord], json: bool) {
    if json {
        for e in entries {
            outln!("{}", audit_json(e));
        }
        return;
    }
    let header = ["seq", "time", "identity", "role", "rpc", "purpose", "decision", "outcome", "fields"];
    let rows: Vec<[String; 9]> = entries
        .iter()
        .map(|e| {
            [
                e.seq.to_string(),
                when(e.time_ms),
                terminal_safe(&e.identity),
                terminal_safe(&e.role),
                terminal_safe(&e.rpc),
                terminal_safe(&e.purpose),
                terminal_safe(&e.decision),
                terminal_safe(&e.outcome),
                terminal_safe(&e.fields.join(",")),
            ]
        })
        .collect();
    print_table(&header, &rows);
}

/// A table whose columns are as wide as their widest value: nothing is cut.
pub(crate) fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
        }
        out
    };
    outln!("{}", line(header.to_vec()));
    for row in rows {
        outln!("{}", line(row.iter().map(String::as_str).collect()));
    }
}
