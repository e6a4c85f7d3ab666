//! What one audit entry holds (`AuditEntry`, its typed fields) and a stored checkpoint: the
//! canonical JSON every chain hash is computed over.

use super::*;

/// What the decide step said about a request, as the entry records it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decided {
    /// Refused (or failed) before a decision was made.
    #[default]
    None,
    Allow,
    Deny,
}

impl Decided {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

impl PartialEq<&str> for Decided {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The key versions an entry names: those of the record's data key (`kek=N gen=M`), a KEK
/// version alone (`kek=N`: rotation, retirement), or none. Stored as that text, as always.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyVersions {
    pub kek: Option<u32>,
    pub generation: Option<u32>,
}

impl KeyVersions {
    pub fn kek(kek: u32) -> Self {
        Self { kek: Some(kek), generation: None }
    }

    pub fn data_key(kek: u32, generation: u32) -> Self {
        Self { kek: Some(kek), generation: Some(generation) }
    }

    /// Reads the stored text back; `None` for one this build never writes.
    pub fn parse(text: &str) -> Option<Self> {
        let mut out = Self::default();
        for part in text.split(' ').filter(|p| !p.is_empty()) {
            match part.split_once('=')? {
                ("kek", n) if out.kek.is_none() => out.kek = Some(n.parse().ok()?),
                ("gen", n) if out.generation.is_none() && out.kek.is_some() => {
                    out.generation = Some(n.parse().ok()?)
                }
                _ => return None,
            }
        }
        Some(out)
    }
}

impl std::fmt::Display for KeyVersions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.kek, self.generation) {
            (Some(k), Some(g)) => write!(f, "kek={k} gen={g}"),
            (Some(k), None) => write!(f, "kek={k}"),
            _ => Ok(()),
        }
    }
}

impl PartialEq<&str> for KeyVersions {
    fn eq(&self, other: &&str) -> bool {
        Self::parse(other).is_some_and(|o| o == *self)
    }
}

impl Serialize for KeyVersions {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyVersions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).ok_or_else(|| serde::de::Error::custom("key versions"))
    }
}

/// One audited request (PCI DSS 10.2.2). `seq` and `time_ms` are set when it is appended.
/// Fields are declared in alphabetical order so that serialising the struct directly yields the
/// canonical form (keys sorted) without building a map; a test holds the two equal. The three
/// fields of a carried-forward break are left out of every other entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEntry {
    /// `AuditBreak` only: the signed head the chain goes on from, past the damage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<StoredCheckpoint>,
    /// The caller's own `x-request-id`, when it sent one (beside the server's `request_id`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_request_id: String,
    /// `AuditBreak` only: the first and last seq that can no longer be trusted.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub damaged_from: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub damaged_to: u64,
    /// `allow`, `deny`, or `none` when the request was refused before a decision.
    pub decision: Decided,
    pub fields: Vec<String>,
    pub identity: String,
    /// `kek=N gen=M` of the record's data key, when one was used.
    pub key_versions: KeyVersions,
    /// The regulations' name of the operation (`read`), empty before one was known.
    pub operation: String,
    /// The gRPC status code name (`Ok`, `PermissionDenied`, ...).
    pub outcome: Outcome,
    pub peer: String,
    pub purpose: String,
    /// Why it was refused or failed; never a value.
    pub reason: String,
    pub record_id: String,
    pub regulations_version: String,
    /// How many identical unauthenticated events from this address followed the one recorded
    /// first within its interval: counted, not written one by one (absent on every other entry).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeated: u64,
    pub request_id: String,
    pub role: String,
    /// The RPC (`GetRecord`) or operator action (`Unseal`, `SIGHUP`).
    pub rpc: String,
    pub rule: String,
    pub seq: u64,
    /// The data subject's blind index (hex), never the subject id itself.
    pub subject: String,
    pub time_ms: u64,
    /// A change that wrote authority values (identities, tokens, consent, regulations, the key
    /// job): the write id their tags carry, so each value names the entry that wrote it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub write: u64,
    /// What that change wrote (`identity:alice`) or removed (`-token:…`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writes: Vec<String>,
}

pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Bounded, printable copy of a caller's string.
pub fn clean(s: &str) -> String {
    printable(s)
}

/// Most field names an entry records; the rest are counted (`(+N more)`), so no request, however
/// many names it sends, makes an entry large enough to stop query or export.
pub const MAX_FIELDS_RECORDED: usize = 64;
/// Longest a recorded field name, and any other string of an entry, may be (bytes; cut at a
/// character boundary): with the names bound, an entry stays under ~20 KB.
const MAX_NAME_BYTES: usize = 128;
const MAX_TEXT_BYTES: usize = 512;

pub(crate) fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut at = max - '…'.len_utf8();
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push('…');
    }
}

impl AuditEntry {
    /// Bounds what callers put in: the first [`MAX_FIELDS_RECORDED`] names and a count, every
    /// string cut to its limit. Applied to every entry as it is appended.
    pub fn bound(&mut self) {
        if self.fields.len() > MAX_FIELDS_RECORDED {
            let more = self.fields.len() - MAX_FIELDS_RECORDED;
            self.fields.truncate(MAX_FIELDS_RECORDED);
            self.fields.push(format!("(+{more} more)"));
        }
        for f in &mut self.fields {
            cut(f, MAX_NAME_BYTES);
        }
        for text in [
            &mut self.client_request_id,
            &mut self.identity,
            &mut self.operation,
            &mut self.peer,
            &mut self.purpose,
            &mut self.reason,
            &mut self.record_id,
            &mut self.regulations_version,
            &mut self.request_id,
            &mut self.role,
            &mut self.rpc,
            &mut self.rule,
            &mut self.subject,
        ] {
            cut(text, MAX_TEXT_BYTES);
        }
    }

    /// The bytes the chain hashes: compact JSON with keys sorted — what an offline verifier gets by
    /// re-serialising a parsed entry (serde_json's default map is sorted).
    pub fn canonical(&self) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(self).map_err(|_| StoreError::Corrupt("audit entry (encode)"))
    }
}

/// A stored checkpoint, as JSON (fields in key order: it is also embedded in `AuditBreak` entries).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub hash: String,
    /// The seq of the checkpoint signed before it; absent in format 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<u64>,
    pub seq: u64,
    pub signature: String,
    pub time_ms: u64,
}

impl StoredCheckpoint {
    pub fn to_checkpoint(&self) -> Option<Checkpoint> {
        Some(Checkpoint {
            seq: self.seq,
            hash: hex::decode(&self.hash).ok()?.try_into().ok()?,
            time_ms: self.time_ms,
            prev: self.prev,
            signature: hex::decode(&self.signature).ok()?,
        })
    }

    pub fn from_checkpoint(cp: &Checkpoint) -> Self {
        Self {
            hash: hex::encode(cp.hash),
            prev: cp.prev,
            seq: cp.seq,
            signature: hex::encode(&cp.signature),
            time_ms: cp.time_ms,
        }
    }

    pub fn parse(json: &[u8]) -> Option<Checkpoint> {
        serde_json::from_slice::<StoredCheckpoint>(json).ok()?.to_checkpoint()
    }
}
