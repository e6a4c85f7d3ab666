//! The audit log's tamper evidence: a hash chain over canonical entries, Ed25519-signed
//! checkpoints of its head chained to each other, and HMAC tags of every acknowledged head in
//! between. Shared by the server (which writes and verifies the live log) and the client (which
//! verifies an export offline with only the public key).
//!
//! `hash(n) = SHA-256(hash(n-1) ‖ canonical_json(entry n))`, `hash(0) = 32 zero bytes`.
//! A checkpoint signs `"khlang/v2/audit-checkpoint" ‖ seq u64 ‖ hash(seq) ‖ time_ms u64 ‖ prev u64`,
//! `prev` being the seq of the checkpoint signed before it (0 for the first), so deleting one is
//! caught; checkpoints of format 1 (no `prev`) signed `"khlang/v1/audit-checkpoint" ‖ seq ‖ hash ‖
//! time_ms` and still verify. A head tag is `HMAC-SHA256(tag key, seq u64 ‖ hash(seq))`: the vault
//! writes one with each group of entries it acknowledges, so the entries after the last signature
//! cannot be rewritten by someone without the root key either.

use std::fmt;

use ring::signature::{self, Ed25519KeyPair, KeyPair};
use zeroize::Zeroizing;

use crate::hierarchy::DerivedKey;
use crate::{Key256, KeyError, labels};

pub const GENESIS: [u8; 32] = [0u8; 32];

/// The RPC name of the entry a vault writes when it finds its log damaged: it names the damaged
/// range and links the chain on from the last head the vault signed (its `anchor`).
pub const AUDIT_BREAK_RPC: &str = "AuditBreak";

/// The next link of the chain.
pub fn chain_hash(prev: &[u8; 32], canonical_entry: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(prev);
    ctx.update(canonical_entry);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn checkpoint_message(seq: u64, hash: &[u8; 32], time_ms: u64, prev: Option<u64>) -> Vec<u8> {
    let label = if prev.is_some() { labels::AUDIT_CHECKPOINT_CHAINED } else { labels::AUDIT_CHECKPOINT };
    let mut m = label.to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m.extend_from_slice(&time_ms.to_be_bytes());
    if let Some(prev) = prev {
        m.extend_from_slice(&prev.to_be_bytes());
    }
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

    /// Signs head `(seq, hash)`, chained to the checkpoint signed before it at seq `prev`.
    pub fn sign_checkpoint(
        &self,
        seq: u64,
        hash: &[u8; 32],
        time_ms: u64,
        prev: u64,
    ) -> Result<Checkpoint, KeyError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(self.seed.expose_secret())
            .map_err(|_| KeyError::Derivation)?;
        let msg = Zeroizing::new(checkpoint_message(seq, hash, time_ms, Some(prev)));
        let signature = pair.sign(&msg).as_ref().to_vec();
        Ok(Checkpoint { seq, hash: *hash, time_ms, prev: Some(prev), signature })
    }

    /// Signs a whole backup file by its SHA-256, so a restore checks it against the public key
    /// the operator holds before writing anything.
    pub fn sign_backup(&self, sha256: &[u8; 32]) -> Result<Vec<u8>, KeyError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(self.seed.expose_secret())
            .map_err(|_| KeyError::Derivation)?;
        Ok(pair.sign(&backup_message(sha256)).as_ref().to_vec())
    }
}

fn backup_message(sha256: &[u8; 32]) -> Vec<u8> {
    [labels::BACKUP_SIGNATURE, sha256.as_slice()].concat()
}

/// Checks a backup's signature ([`AuditSigner::sign_backup`]) under `public_key`.
pub fn verify_backup(public_key: &[u8], sha256: &[u8; 32], signature: &[u8]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(&backup_message(sha256), signature)
        .is_ok()
}

impl fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSigner").field("public", &hex_short(&self.public)).finish_non_exhaustive()
    }
}

fn hex_short(b: &[u8]) -> String {
    b.iter().take(4).map(|x| format!("{x:02x}")).collect()
}

/// Tags acknowledged heads (HMAC-SHA256 under a key derived from the derivation key). Cheaper than
/// a signature (about a microsecond), so every group commit gets one; only the vault can check it.
pub struct HeadTagger(DerivedKey);

impl HeadTagger {
    pub(crate) fn new(key: DerivedKey) -> Self {
        Self(key)
    }

    fn message(seq: u64, hash: &[u8; 32]) -> [u8; 40] {
        let mut m = [0u8; 40];
        m[..8].copy_from_slice(&seq.to_be_bytes());
        m[8..].copy_from_slice(hash);
        m
    }

    pub fn tag(&self, seq: u64, hash: &[u8; 32]) -> [u8; 32] {
        self.0.mac(&Self::message(seq, hash))
    }

    /// Constant-time.
    pub fn verify(&self, seq: u64, hash: &[u8; 32], tag: &[u8]) -> bool {
        self.0.verify(&Self::message(seq, hash), tag)
    }
}

impl fmt::Debug for HeadTagger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeadTagger").finish_non_exhaustive()
    }
}

/// Checks a format-1 or format-2 checkpoint signature.
pub fn verify_checkpoint(public_key: &[u8], cp: &Checkpoint) -> bool {
    let key = signature::UnparsedPublicKey::new(&signature::ED25519, public_key);
    key.verify(&checkpoint_message(cp.seq, &cp.hash, cp.time_ms, cp.prev), &cp.signature).is_ok()
}

/// Where a log stops being trustworthy, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub seq: u64,
    pub reason: String,
}

/// What a verification proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every entry verified and a signed checkpoint covers the newest.
    Intact,
    /// Nothing is wrong, but not everything is covered by a signature: why.
    Unverified(String),
    /// The first entry that can no longer be trusted.
    Broken(ChainBreak),
}

/// The result of verifying a log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChainReport {
    pub entries: u64,
    pub checkpoints: u64,
    /// Seq of the last checkpoint whose signature and hash verified.
    pub last_checkpoint: u64,
    /// Seq of the newest entry read.
    pub last_entry: u64,
    /// Seq of the newest entry a verified signature or head tag covers (after the first break,
    /// the last one before it).
    pub proven: u64,
    pub first_break: Option<ChainBreak>,
    /// Where verification went on after a break the vault carried forward (`AuditBreak` entries).
    pub resumed_at: Vec<u64>,
    /// The first break after the last carried-forward one: damage the vault has not yet recorded.
    pub uncarried: Option<ChainBreak>,
}

impl ChainReport {
    pub fn verdict(&self) -> Verdict {
        if let Some(b) = &self.first_break {
            return Verdict::Broken(b.clone());
        }
        if self.last_entry == 0 {
            return Verdict::Unverified("the log holds no entries".into());
        }
        if self.last_checkpoint == 0 {
            return Verdict::Unverified("no signed checkpoint verified".into());
        }
        if self.last_checkpoint < self.last_entry {
            return Verdict::Unverified(format!(
                "entries {} to {} are not covered by a signed checkpoint",
                self.last_checkpoint + 1,
                self.last_entry
            ));
        }
        Verdict::Intact
    }
}

/// A signed checkpoint as read back from storage, an export or a witness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: [u8; 32],
    pub time_ms: u64,
    /// The seq of the checkpoint signed before this one; `None` for format 1, which did not say.
    pub prev: Option<u64>,
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// Parses the JSON object every store of checkpoints uses
    /// (`{"hash","prev","seq","signature","time_ms"}`, hex strings).
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        let hash = hex_decode(v["hash"].as_str()?)?.try_into().ok()?;
        Some(Self {
            seq: v["seq"].as_u64()?,
            hash,
            time_ms: v["time_ms"].as_u64()?,
            prev: match &v["prev"] {
                serde_json::Value::Null => None,
                p => Some(p.as_u64()?),
            },
            signature: hex_decode(v["signature"].as_str()?)?,
        })
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// What an `AuditBreak` entry declares: the damaged range and the signed head the chain goes on
/// from.
#[derive(Debug, Clone)]
pub struct BreakDeclaration {
    pub damaged_from: u64,
    pub damaged_to: u64,
    pub reason: String,
    pub anchor: Checkpoint,
}

/// The declaration of an `AuditBreak` entry, if `canonical` is one. Found without parsing other
/// entries, in constant time: with keys sorted, only an entry with an `anchor` (which only
/// `AuditBreak` entries have) starts with that key; a caller's string cannot come first.
pub fn break_declaration(canonical: &[u8]) -> Option<Result<BreakDeclaration, ()>> {
    canonical.starts_with(b"{\"anchor\":").then(|| {
        let v: serde_json::Value = serde_json::from_slice(canonical).map_err(|_| ())?;
        if v["rpc"].as_str() != Some(AUDIT_BREAK_RPC) {
            return Err(());
        }
        Ok(BreakDeclaration {
            damaged_from: v["damaged_from"].as_u64().ok_or(())?,
            damaged_to: v["damaged_to"].as_u64().ok_or(())?,
            reason: v["reason"].as_str().unwrap_or_default().to_owned(),
            anchor: Checkpoint::from_json(&v["anchor"]).ok_or(())?,
        })
    })
}

/// Verifies entries fed in storage order. Streaming: memory is one hash per checkpoint to check,
/// not per entry. Each proof (a signed checkpoint, a head tag, a head the caller knows) covers
/// every entry up to it; a rewrite the chain alone cannot show (a forger recomputed it) is named
/// at the first entry after the last proof before it.
pub struct ChainVerifier<'a> {
    public_key: &'a [u8],
    tagger: Option<&'a HeadTagger>,
    expected_seq: u64,
    prev: [u8; 32],
    report: ChainReport,
    /// Checkpoints sorted by seq, not yet reached.
    checkpoints: std::collections::VecDeque<Checkpoint>,
    /// Heads `(seq, hash)` known to be genuine (tags from the store, the live head), not yet reached.
    known_heads: std::collections::VecDeque<(u64, [u8; 32])>,
    /// The seq of the last checkpoint verified, for the next one's `prev`; `None`: not known.
    last_cp: Option<u64>,
    /// After a break: skipping to an `AuditBreak` entry that carries the chain on.
    skipping: bool,
}

impl<'a> ChainVerifier<'a> {
    /// `checkpoints` may come in any order; each is checked when the chain reaches its seq.
    pub fn new(public_key: &'a [u8], checkpoints: Vec<Checkpoint>) -> Self {
        Self::starting_at(public_key, checkpoints, 1, GENESIS, Some(0))
    }

    /// A verifier for the part of a log that starts at `seq`, given the hash stored with entry
    /// `seq - 1` (checked by whoever verifies the part before, or an anchor's signed hash) and the
    /// seq of the last checkpoint before `seq` where known. Lets two threads verify two halves:
    /// every link is checked against the stored hash before it, so the halves together check
    /// exactly what one pass would.
    pub fn starting_at(
        public_key: &'a [u8],
        mut checkpoints: Vec<Checkpoint>,
        seq: u64,
        prev: [u8; 32],
        last_cp: Option<u64>,
    ) -> Self {
        checkpoints.sort_by_key(|c| c.seq);
        checkpoints.dedup();
        let start = seq.max(1);
        let report = ChainReport {
            checkpoints: checkpoints.len() as u64,
            proven: start - 1,
            ..ChainReport::default()
        };
        Self {
            public_key,
            tagger: None,
            expected_seq: start,
            prev,
            report,
            checkpoints: checkpoints.into(),
            known_heads: Default::default(),
            last_cp,
            skipping: false,
        }
    }

    /// For a part that starts where another part ends (the two-thread split): the hash it starts
    /// from proves nothing by itself.
    pub fn unproven_start(mut self) -> Self {
        self.report.proven = 0;
        self
    }

    /// Checks head tags (the vault's own verification; an offline verifier has no tag key).
    pub fn with_tagger(mut self, tagger: &'a HeadTagger) -> Self {
        self.tagger = Some(tagger);
        self
    }

    /// Heads the log must contain, already known to be genuine (tagged heads the store recorded,
    /// the head a live vault holds in memory).
    pub fn with_known_heads(mut self, mut heads: Vec<(u64, [u8; 32])>) -> Self {
        heads.sort_by_key(|h| h.0);
        self.known_heads = heads.into();
        self
    }

    fn fail(&mut self, seq: u64, reason: impl Into<String>) {
        let b = ChainBreak { seq, reason: reason.into() };
        // The earliest seq named wins: a carried-forward break may name damage before the place
        // where this verifier first noticed it.
        if self.report.first_break.as_ref().is_none_or(|f| f.seq > seq) {
            self.report.first_break = Some(b.clone());
        }
        if self.report.uncarried.is_none() {
            self.report.uncarried = Some(b);
        }
        self.skipping = true;
    }

    /// A proof at `seq` does not match the chain that was stored: everything after the previous
    /// proof is in doubt (a forger recomputes the chain from the entry they edit on).
    fn fail_rewritten(&mut self, seq: u64, what: &str) {
        let from = self.report.proven + 1;
        self.fail(from, format!("entries {from} to {seq} do not match {what}: rewritten after it was made"));
    }

    fn proved(&mut self, seq: u64) {
        self.report.proven = self.report.proven.max(seq);
    }

    /// Whether the chain is broken (some verification may still go on after an `AuditBreak`).
    pub fn broken(&self) -> bool {
        self.report.first_break.is_some()
    }

    /// Whether the verifier is past a break, looking for an `AuditBreak` entry to go on from.
    pub fn is_skipping(&self) -> bool {
        self.skipping
    }

    /// A verifier for a part that follows a part which ended broken: it only looks for an
    /// `AuditBreak` entry to go on from, as one pass over both parts would.
    pub fn skipping(mut self) -> Self {
        self.skipping = true;
        self
    }

    /// Feeds entry `seq` with its canonical bytes and the hash stored beside it. `embedded_seq` is
    /// the seq written inside the entry. Damaged lines come as `canonical = []`, no hash.
    pub fn entry(&mut self, seq: u64, embedded_seq: Option<u64>, canonical: &[u8], stored_hash: &[u8]) {
        self.report.last_entry = self.report.last_entry.max(seq);
        if let Some(declared) = break_declaration(canonical) {
            return self.audit_break(seq, embedded_seq, canonical, stored_hash, declared.ok());
        }
        if self.skipping {
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
                format!(
                    "entry {seq} is damaged or holds the content of another position (reordered or inserted)"
                ),
            );
        }
        let hash = chain_hash(&self.prev, canonical);
        if hash.as_slice() != stored_hash {
            return self.fail(
                seq,
                format!("entry {seq} does not match its hash (edited, or the chain was cut here)"),
            );
        }
        self.prev = hash;
        self.expected_seq = seq + 1;
        self.check_proofs(seq, &hash);
    }

    fn check_proofs(&mut self, seq: u64, hash: &[u8; 32]) {
        while let Some(cp) = self.checkpoints.front() {
            if cp.seq > seq {
                break;
            }
            let Some(cp) = self.checkpoints.pop_front() else { break };
            if cp.seq < seq {
                continue;
            }
            if !verify_checkpoint(self.public_key, &cp) {
                return self.fail(seq, format!("the checkpoint at {seq} has an invalid signature"));
            }
            if cp.hash != *hash {
                return self.fail_rewritten(seq, &format!("the signed checkpoint at {seq}"));
            }
            if let (Some(prev), Some(last)) = (cp.prev, self.last_cp)
                && prev != last
            {
                let (at, why) = if prev > last {
                    (
                        prev,
                        format!(
                            "the signed checkpoint at {prev}, which the one at {seq} follows, is missing (deleted)"
                        ),
                    )
                } else {
                    (
                        last,
                        format!(
                            "the checkpoint at {seq} follows {prev}, not the checkpoint at {last} (a fork: the log was rolled back and signed again)"
                        ),
                    )
                };
                return self.fail(at, why);
            }
            self.last_cp = Some(seq);
            self.report.last_checkpoint = seq;
            self.proved(seq);
        }
        while let Some(&(at, known)) = self.known_heads.front() {
            if at > seq {
                break;
            }
            self.known_heads.pop_front();
            if at < seq {
                continue;
            }
            if known != *hash {
                return self.fail_rewritten(seq, &format!("the head the vault recorded at {seq}"));
            }
            self.proved(seq);
        }
    }

    /// Feeds a head tag the log holds for entry `seq` (written after the entries it covers).
    pub fn tag(&mut self, seq: u64, tag: &[u8]) {
        let Some(tagger) = self.tagger else { return };
        if self.skipping {
            return;
        }
        if seq + 1 != self.expected_seq {
            return self.fail(
                self.report.proven + 1,
                format!("a head tag for entry {seq} stands after entry {}", self.expected_seq - 1),
            );
        }
        if !tagger.verify(seq, &self.prev, tag) {
            return self.fail_rewritten(seq, &format!("the vault's head tag at {seq}"));
        }
        self.proved(seq);
    }

    /// An `AuditBreak` entry: the vault found damage and carried it forward. The damage it names
    /// is a break (the first one stays first); the chain goes on from the signed anchor it names.
    fn audit_break(
        &mut self,
        seq: u64,
        embedded_seq: Option<u64>,
        canonical: &[u8],
        stored_hash: &[u8],
        declared: Option<BreakDeclaration>,
    ) {
        let Some(d) = declared else {
            return self.fail(seq, format!("entry {seq} is a malformed AuditBreak entry"));
        };
        self.fail(
            d.damaged_from,
            format!("the vault found entries {} to {} damaged: {}", d.damaged_from, d.damaged_to, d.reason),
        );
        let linked = chain_hash(&d.anchor.hash, canonical);
        if embedded_seq != Some(seq)
            || linked.as_slice() != stored_hash
            || seq <= d.damaged_to
            || d.anchor.seq >= seq
            || !verify_checkpoint(self.public_key, &d.anchor)
        {
            // Not a genuine carry-forward: verification cannot go on.
            return;
        }
        self.report.entries += 1;
        self.report.resumed_at.push(seq);
        self.report.uncarried = None;
        self.skipping = false;
        self.prev = linked;
        self.expected_seq = seq + 1;
        self.last_cp = Some(d.anchor.seq);
        // Proofs inside the damaged range can no longer be reached.
        while self.checkpoints.front().is_some_and(|c| c.seq < seq) {
            self.checkpoints.pop_front();
        }
        while self.known_heads.front().is_some_and(|h| h.0 < seq) {
            self.known_heads.pop_front();
        }
        self.check_proofs(seq, &linked);
    }

    /// Ends verification: a proof beyond the last entry means entries were cut off the end.
    pub fn finish(mut self) -> ChainReport {
        if !self.skipping {
            let beyond = self
                .checkpoints
                .front()
                .map(|c| c.seq)
                .into_iter()
                .chain(self.known_heads.front().map(|h| h.0))
                .min();
            if let Some(at) = beyond {
                let seq = self.expected_seq;
                self.fail(
                    seq,
                    format!(
                        "a signed or recorded head at {at} is beyond the last entry {}: the log was truncated",
                        seq - 1
                    ),
                );
            }
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
    let mut resumed_at = first.resumed_at.clone();
    resumed_at.extend(second.resumed_at.iter().copied());
    let last_entry = first.last_entry.max(second.last_entry);
    if first.first_break.is_some() && second.resumed_at.is_empty() && first.resumed_at.is_empty() {
        return ChainReport { checkpoints, last_entry, ..first };
    }
    ChainReport {
        entries: first.entries + second.entries,
        checkpoints,
        last_checkpoint: first.last_checkpoint.max(second.last_checkpoint),
        last_entry,
        proven: if first.first_break.is_some() { first.proven } else { first.proven.max(second.proven) },
        uncarried: if second.resumed_at.is_empty() {
            first.uncarried.or(second.uncarried)
        } else {
            second.uncarried
        },
        first_break: [first.first_break, second.first_break].into_iter().flatten().min_by_key(|b| b.seq),
        resumed_at,
    }
}
