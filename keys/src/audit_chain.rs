//! The audit log's tamper evidence: a hash chain over canonical entries, and Ed25519-signed
//! checkpoints of its head. Shared by the server (which writes and verifies the live log) and the
//! client (which verifies an export offline with only the public key).
//!
//! `hash(n) = SHA-256(hash(n-1) ‖ canonical_json(entry n))`, `hash(0) = 32 zero bytes`.
//! A checkpoint signs `"khlang/v1/audit-checkpoint" ‖ seq u64 ‖ hash(seq) ‖ time_ms u64`.

use std::fmt;

use ring::signature::{self, Ed25519KeyPair, KeyPair};
use zeroize::Zeroizing;

use crate::{Key256, KeyError, labels};

pub const GENESIS: [u8; 32] = [0u8; 32];

/// The next link of the chain.
pub fn chain_hash(prev: &[u8; 32], canonical_entry: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(prev);
    ctx.update(canonical_entry);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn checkpoint_message(seq: u64, hash: &[u8; 32], time_ms: u64) -> Vec<u8> {
    let mut m = labels::AUDIT_CHECKPOINT.to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m.extend_from_slice(&time_ms.to_be_bytes());
    m
}

/// Signs checkpoints. Holds the Ed25519 seed (derived from the derivation key), wiped on drop.
pub struct AuditSigner {
    seed: Key256,
    public: Vec<u8>,
}

impl AuditSigner {
    pub(crate) fn from_seed(seed: Key256) -> Result<Self, KeyError> {
        let pair =
            Ed25519KeyPair::from_seed_unchecked(seed.expose_secret()).map_err(|_| KeyError::Derivation)?;
        let public = pair.public_key().as_ref().to_vec();
        Ok(Self { seed, public })
    }

    /// The 32-byte Ed25519 public key that verifies this vault's checkpoints.
    pub fn public_key(&self) -> &[u8] {
        &self.public
    }

    pub fn sign_checkpoint(&self, seq: u64, hash: &[u8; 32], time_ms: u64) -> Result<Vec<u8>, KeyError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(self.seed.expose_secret())
            .map_err(|_| KeyError::Derivation)?;
        let msg = Zeroizing::new(checkpoint_message(seq, hash, time_ms));
        Ok(pair.sign(&msg).as_ref().to_vec())
    }
}

impl fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSigner").field("public", &hex_short(&self.public)).finish_non_exhaustive()
    }
}

fn hex_short(b: &[u8]) -> String {
    b.iter().take(4).map(|x| format!("{x:02x}")).collect()
}

pub fn verify_checkpoint(
    public_key: &[u8],
    seq: u64,
    hash: &[u8; 32],
    time_ms: u64,
    signature: &[u8],
) -> bool {
    let key = signature::UnparsedPublicKey::new(&signature::ED25519, public_key);
    key.verify(&checkpoint_message(seq, hash, time_ms), signature).is_ok()
}

/// Where a log stops being trustworthy, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub seq: u64,
    pub reason: String,
}

/// The result of verifying a log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChainReport {
    pub entries: u64,
    pub checkpoints: u64,
    /// Seq of the last checkpoint whose signature and hash verified.
    pub last_checkpoint: u64,
    pub first_break: Option<ChainBreak>,
}

/// A signed checkpoint as read back from storage or an export.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: [u8; 32],
    pub time_ms: u64,
    pub signature: Vec<u8>,
}

/// Verifies entries fed in storage order, then checkpoints. Streaming: memory is one hash per
/// checkpoint to check, not per entry.
pub struct ChainVerifier<'a> {
    public_key: &'a [u8],
    expected_seq: u64,
    prev: [u8; 32],
    report: ChainReport,
    /// Checkpoints sorted by seq, not yet reached.
    checkpoints: std::collections::VecDeque<Checkpoint>,
}

impl<'a> ChainVerifier<'a> {
    /// `checkpoints` may come in any order; each is checked when the chain reaches its seq.
    pub fn new(public_key: &'a [u8], mut checkpoints: Vec<Checkpoint>) -> Self {
        checkpoints.sort_by_key(|c| c.seq);
        let report = ChainReport { checkpoints: checkpoints.len() as u64, ..ChainReport::default() };
        Self { public_key, expected_seq: 1, prev: GENESIS, report, checkpoints: checkpoints.into() }
    }

    /// A verifier for the part of a log that starts at `seq`, given the hash stored with entry
    /// `seq - 1` (checked by whoever verifies the part before). Lets two threads verify two halves:
    /// every link is checked against the stored hash before it, so the halves together check
    /// exactly what one pass would.
    pub fn starting_at(public_key: &'a [u8], checkpoints: Vec<Checkpoint>, seq: u64, prev: [u8; 32]) -> Self {
        let mut v = Self::new(public_key, checkpoints);
        v.expected_seq = seq.max(1);
        v.prev = prev;
        v
    }

    fn fail(&mut self, seq: u64, reason: impl Into<String>) {
        if self.report.first_break.is_none() {
            self.report.first_break = Some(ChainBreak { seq, reason: reason.into() });
        }
    }

    pub fn broken(&self) -> bool {
        self.report.first_break.is_some()
    }

    /// Feeds entry `seq` with its canonical bytes and the hash stored beside it. `embedded_seq` is
    /// the seq written inside the entry.
    pub fn entry(&mut self, seq: u64, embedded_seq: Option<u64>, canonical: &[u8], stored_hash: &[u8]) {
        if self.broken() {
            return;
        }
        self.report.entries += 1;
        if seq != self.expected_seq {
            let what =
                if seq > self.expected_seq { "missing (deleted or truncated)" } else { "out of order" };
            return self.fail(self.expected_seq, format!("entry {} is {what}", self.expected_seq));
        }
        if embedded_seq != Some(seq) {
            return self.fail(
                seq,
                format!("entry {seq} holds the content of another position (reordered or inserted)"),
            );
        }
        let hash = chain_hash(&self.prev, canonical);
        if hash.as_slice() != stored_hash {
            return self.fail(
                seq,
                format!("entry {seq} does not match its hash (edited, or the chain was cut here)"),
            );
        }
        while let Some(cp) = self.checkpoints.front() {
            if cp.seq > seq {
                break;
            }
            let cp = self.checkpoints.pop_front().unwrap_or_else(|| unreachable!("front was Some"));
            if cp.seq == seq {
                if cp.hash != hash {
                    return self.fail(seq, format!("the signed checkpoint at {seq} names another hash"));
                }
                if !verify_checkpoint(self.public_key, cp.seq, &cp.hash, cp.time_ms, &cp.signature) {
                    return self.fail(seq, format!("the checkpoint at {seq} has an invalid signature"));
                }
                self.report.last_checkpoint = seq;
            }
        }
        self.prev = hash;
        self.expected_seq = seq + 1;
    }

    /// Ends verification: a checkpoint beyond the last entry means entries were cut off the end.
    pub fn finish(mut self) -> ChainReport {
        if !self.broken()
            && let Some(cp) = self.checkpoints.front().cloned()
        {
            let seq = self.expected_seq;
            self.fail(
                seq,
                format!(
                    "a signed checkpoint at {} is beyond the last entry {}: the log was truncated",
                    cp.seq,
                    seq - 1
                ),
            );
        }
        self.report
    }

    /// The head reached so far: `(last seq, its hash)`.
    pub fn head(&self) -> (u64, [u8; 32]) {
        (self.expected_seq - 1, self.prev)
    }

    /// Ends a part that must reach `last` (the part after it starts at `last + 1`).
    pub fn finish_part(mut self, last: u64) -> ChainReport {
        if !self.broken() && self.expected_seq != last + 1 {
            let seq = self.expected_seq;
            self.fail(seq, format!("entry {seq} is missing (deleted or truncated)"));
        }
        self.report
    }
}

/// Joins the reports of two consecutive parts into the report one pass over the whole would give.
pub fn join_reports(first: ChainReport, second: ChainReport) -> ChainReport {
    let checkpoints = first.checkpoints + second.checkpoints;
    if first.first_break.is_some() {
        return ChainReport { checkpoints, ..first };
    }
    ChainReport {
        entries: first.entries + second.entries,
        checkpoints,
        last_checkpoint: first.last_checkpoint.max(second.last_checkpoint),
        first_break: second.first_break,
    }
}
