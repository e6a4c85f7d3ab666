//! Domain-separation labels. Each use of a key has its own label, so no two uses can collide.

/// Associated data prefix when the root key is sealed under the passphrase-derived key.
pub const ROOT_SEAL_AAD: &[u8] = b"khlang/v1/root-seal";
/// Associated data prefix when a KEK is wrapped under the root key.
pub const KEK_WRAP_AAD: &[u8] = b"khlang/v1/kek-wrap";
/// Associated data prefix when a record's data key is wrapped under a KEK.
pub const DATA_KEY_WRAP_AAD: &[u8] = b"khlang/v1/data-key-wrap";
/// Associated data prefix of every field envelope.
pub const FIELD_AAD: &[u8] = b"khlang/v1/field";
/// HKDF salt for every key derived from the derivation key.
pub const HKDF_SALT: &[u8] = b"khlang/v1/hkdf-salt";
/// HKDF info: the pepper that keys API-token hashes.
pub const TOKEN_PEPPER: &[u8] = b"khlang/v1/token-pepper";
/// HKDF info: the key of the blind index over data-subject ids.
pub const SUBJECT_INDEX: &[u8] = b"khlang/v1/subject-blind-index";
/// HKDF info: the seed of the Ed25519 key that signs audit checkpoints.
pub const AUDIT_SIGNING: &[u8] = b"khlang/v1/audit-signing-key";
/// Prefix of every signed audit checkpoint message.
pub const AUDIT_CHECKPOINT: &[u8] = b"khlang/v1/audit-checkpoint";
/// Associated data prefix when a custodian's share of the root key is sealed under their passphrase.
pub const SHARE_SEAL_AAD: &[u8] = b"khlang/v1/custodian-share-seal";
/// Associated data prefix when the derivation key is wrapped under the root key.
pub const DERIVATION_KEY_WRAP_AAD: &[u8] = b"khlang/v1/derivation-key-wrap";
/// Prefix of every signed audit checkpoint message that names its predecessor (format 2).
pub const AUDIT_CHECKPOINT_CHAINED: &[u8] = b"khlang/v2/audit-checkpoint";
/// HKDF info: the HMAC key that tags each acknowledged audit head between signed checkpoints.
pub const AUDIT_HEAD_TAG: &[u8] = b"khlang/v1/audit-head-tag";
/// HKDF info: the HMAC key that authenticates every stored value that decides who may do what
/// (identities, tokens, identity requests, consent, regulations, the key job).
pub const AUTHORITY_TAG: &[u8] = b"khlang/v1/authority-tag";
/// Prefix of every authority tag's message, so it can never collide with another HMAC's input.
pub const AUTHORITY_TAG_MESSAGE: &[u8] = b"khlang/v1/authority";
/// Prefix of the message the audit key signs over a whole backup file (its SHA-256).
pub const BACKUP_SIGNATURE: &[u8] = b"khlang/v1/backup-signature";
