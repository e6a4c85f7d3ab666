//! Verifying the access log: an export offline with only the vault's public key, and the live
//! log through the vault.

use super::*;

/// Why an export could not be verified at all (as opposed to verifying and finding a break).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("line {line}: {what}")]
    Malformed { line: usize, what: String },
    #[error("the public key is not 32 bytes of hex")]
    PublicKey,
    #[error(
        "not an audit export of a known format (header format {0:?}; this verifier knows khlang-audit-1 and -2)"
    )]
    Format(String),
    #[error("witness line {line}: not signed by this vault's key")]
    Witness { line: usize },
    #[error("reading the export: {0}")]
    Io(#[from] std::io::Error),
}

/// The export formats this verifier knows (`khlang-audit-2` adds chained checkpoints and
/// carried-forward breaks; format 1 exports verify unchanged).
pub const EXPORT_FORMATS: &[&str] = &["khlang-audit-1", "khlang-audit-2"];

/// Reads a witness file (`khlangd --audit-witness`): one signed checkpoint as JSON a line.
pub fn read_witness(reader: impl std::io::BufRead) -> Result<Vec<Checkpoint>, ExportError> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = || ExportError::Malformed { line: i + 1, what: "not a signed checkpoint".into() };
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|_| bad())?;
        out.push(Checkpoint::from_json(&v).ok_or_else(bad)?);
    }
    Ok(out)
}

/// Checks that every witnessed checkpoint is signed by `public_key_hex` (a witness is a file
/// anyone may have touched): the heads the log must contain, `(seq, hash)`.
pub fn witnessed_heads(
    witness: &[Checkpoint],
    public_key_hex: &str,
) -> Result<Vec<(u64, [u8; 32])>, ExportError> {
    let public_key = decode_public_key(public_key_hex)?;
    witness
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if verify_checkpoint(&public_key, w) {
                Ok((w.seq, w.hash))
            } else {
                Err(ExportError::Witness { line: i + 1 })
            }
        })
        .collect()
}

fn decode_public_key(hex_key: &str) -> Result<Vec<u8>, ExportError> {
    let public_key = hex::decode(hex_key.trim()).map_err(|_| ExportError::PublicKey)?;
    if public_key.len() != 32 {
        return Err(ExportError::PublicKey);
    }
    Ok(public_key)
}

/// Verifies an audit export (JSON Lines from `ExportAudit`) offline, with only the vault's public
/// key: the hash chain, every checkpoint's signature and its link to the one before, breaks the
/// vault carried forward, that no signed entry was cut off, and that the export holds every
/// `witness` checkpoint it reaches (a rolled-back log does not).
pub fn verify_export(
    reader: impl std::io::BufRead,
    public_key_hex: &str,
    witness: &[Checkpoint],
) -> Result<ChainReport, ExportError> {
    let public_key = decode_public_key(public_key_hex)?;
    witnessed_heads(witness, public_key_hex)?;
    let mut entries = Vec::new();
    let mut checkpoints = Vec::new();
    let mut header = false;
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| ExportError::Malformed { line: i + 1, what: what.to_owned() };
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|_| bad("not JSON"))?;
        match v["type"].as_str() {
            Some("header") if !header && entries.is_empty() && checkpoints.is_empty() => {
                let format = v["format"].as_str().unwrap_or_default();
                if !EXPORT_FORMATS.contains(&format) {
                    return Err(ExportError::Format(format.chars().take(40).collect()));
                }
                header = true;
            }
            Some("header") => return Err(bad("a second header")),
            _ if !header => return Err(bad("the export does not start with its header")),
            Some("entry") => {
                let seq = v["seq"].as_u64().ok_or_else(|| bad("entry without seq"))?;
                let hash =
                    hex::decode(v["hash"].as_str().unwrap_or_default()).map_err(|_| bad("bad hash"))?;
                let canonical = serde_json::to_vec(&v["entry"]).map_err(|_| bad("bad entry"))?;
                entries.push((seq, v["entry"]["seq"].as_u64(), canonical, hash));
            }
            Some("damaged") => {
                let seq = v["seq"].as_u64().ok_or_else(|| bad("damaged line without seq"))?;
                entries.push((seq, None, Vec::new(), Vec::new()));
            }
            Some("checkpoint") => {
                checkpoints.push(Checkpoint::from_json(&v).ok_or_else(|| bad("bad checkpoint"))?)
            }
            _ => return Err(bad("unknown line type")),
        }
    }
    if !header {
        return Err(ExportError::Format(String::new()));
    }
    // An archive, or an export made after one, starts after 1: the signed checkpoint just before
    // its first entry anchors it.
    let first = entries.first().map_or(1, |e| e.0);
    checkpoints.extend(witness.iter().filter(|w| w.seq >= first).cloned());
    let mut verifier = if first > 1 {
        let anchor = checkpoints.iter().find(|c| c.seq == first - 1).cloned();
        match anchor {
            Some(a) if verify_checkpoint(&public_key, &a) => {
                let later = checkpoints.into_iter().filter(|c| c.seq >= first).collect();
                ChainVerifier::starting_at(&public_key, later, first, a.hash, Some(a.seq))
            }
            _ => {
                return Ok(ChainReport {
                    first_break: Some(ChainBreak {
                        seq: first - 1,
                        reason: format!("no valid signed checkpoint at {} anchors entry {first}", first - 1),
                    }),
                    ..ChainReport::default()
                });
            }
        }
    } else {
        ChainVerifier::new(&public_key, checkpoints)
    };
    for (seq, embedded, canonical, hash) in &entries {
        verifier.entry(*seq, *embedded, canonical, hash);
    }
    Ok(verifier.finish())
}

/// What the vault's live verification reports.
#[derive(Debug, Clone)]
pub struct LiveVerification {
    pub report: ChainReport,
    pub verdict: Verdict,
    /// The vault found damage the operator has not accepted: data requests are refused.
    pub break_open: bool,
    /// The store's records against the log's puts, deletes and erasures.
    pub records: RecordsCheck,
}

/// Records the store holds or lacks against what the log says (`vanished`: put and never
/// deleted, yet gone; `appeared`: held without a put, or after a delete).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordsCheck {
    pub matched: u64,
    pub vanished: u64,
    pub appeared: u64,
    /// Older than the log's first kept entry: not judged.
    pub before_log: u64,
    /// Put or removed while the check ran: not judged.
    pub in_flux: u64,
    /// The first findings (record id and entry).
    pub findings: Vec<String>,
}

impl RecordsCheck {
    /// Every record is accounted for.
    pub fn holds(&self) -> bool {
        self.vanished == 0 && self.appeared == 0
    }
}

impl Client {
    /// Verifies the live log on the vault; it must also hold every `witnessed` head.
    pub async fn verify_audit(
        &mut self,
        witnessed: &[(u64, [u8; 32])],
    ) -> Result<LiveVerification, ClientError> {
        let witnessed = witnessed
            .iter()
            .map(|(seq, hash)| pb::WitnessedHead { seq: *seq, hash: hex::encode(hash) })
            .collect();
        let r = self.audit.verify_audit(pb::VerifyAuditRequest { witnessed }).await?.into_inner();
        let first_break = (r.verdict() == pb::Verdict::Broken)
            .then(|| ChainBreak { seq: r.first_bad_seq, reason: r.reason.clone() });
        let verdict = match r.verdict() {
            pb::Verdict::Intact => Verdict::Intact,
            pb::Verdict::Broken => {
                Verdict::Broken(ChainBreak { seq: r.first_bad_seq, reason: r.reason.clone() })
            }
            _ => Verdict::Unverified(r.reason.clone()),
        };
        Ok(LiveVerification {
            report: ChainReport {
                entries: r.entries,
                checkpoints: r.checkpoints,
                last_checkpoint: r.last_checkpoint,
                last_entry: r.last_entry,
                proven: r.last_checkpoint,
                first_break,
                resumed_at: r.resumed_at,
                uncarried: None,
            },
            verdict,
            break_open: r.break_open,
            records: r
                .records
                .map(|c| RecordsCheck {
                    matched: c.matched,
                    vanished: c.vanished,
                    appeared: c.appeared,
                    before_log: c.before_log,
                    in_flux: c.in_flux,
                    findings: c.findings,
                })
                .unwrap_or_default(),
        })
    }
}
