//! Backups of a vault on sled, their restore, and the check of a vault's every envelope.
//!
//! A backup is one file: what the store holds (ciphertext, wrapped keys, sealed shares, token
//! HMACs, consent by blind index — never a plaintext value or an unwrapped key) and the audit
//! log's files, taken online with every commit held off after a fresh signed checkpoint, so the
//! store and the log in it are one state whose newest entry is signed. Format:
//!
//! ```text
//! "KHLBACKUP" 0x02 | frame* ;  frame = length u32 (big-endian) ‖ postcard(Frame)
//! Header, Store*, AuditFile*, End{ids_from, counts, SHA-256 of every byte before End,
//!                                  Ed25519 signature of that SHA-256 under the audit key}
//! ```
//!
//! The file is authenticated as a whole: a restore is given the vault's audit public key by the
//! operator (`khlang audit public-key`, kept apart from the backups) and writes nothing unless
//! the header names that key and the signature verifies — a file edited and re-hashed, or with
//! entries dropped, is refused. What it holds is authenticated again one by one where it is
//! used: the envelopes' AEAD, the authority values' tags, the audit chain's signatures
//! (`khlangd verify`). A PostgreSQL vault is backed up with the database's own tools.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Caller, SUBJECT_CONTEXT, Vault, operator_entry, prepare};
use crate::audit::Rpc;
use crate::policy::Operation;
use crate::storage::{Changes, Cursor, KeySpace, RawEntry, SCHEMA_VERSION, SledStore, Snapshot};
use crate::{StoreError, VaultError};

/// The file's first bytes: its kind and format.
const MAGIC: &[u8; 10] = b"KHLBACKUP\x02";
/// The largest frame a reader accepts (an audit file travels in chunks of [`AUDIT_CHUNK`]).
const MAX_FRAME: usize = 8 << 20;
const AUDIT_CHUNK: usize = 4 << 20;
/// The backend whose layout the store's entries are in.
const SLED: &str = "sled";
/// The most damaged records a check names (it counts them all).
const NAMED_DAMAGE: usize = 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupHeader {
    pub created_ms: u64,
    pub backend: String,
    /// The store's layout version ([`SCHEMA_VERSION`]).
    pub schema: u32,
    /// The audit entry the fresh checkpoint signs: the newest the backup holds.
    pub audit_seq: u64,
    /// The audit log's public key (hex), to check the restored log's signatures with.
    pub audit_public_key: String,
    pub regulations_version: String,
}

#[derive(Serialize, Deserialize)]
enum Frame {
    Header(BackupHeader),
    Store {
        space: String,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// A chunk of an audit file, appended to the chunks of the same name before it.
    AuditFile {
        name: String,
        bytes: Vec<u8>,
    },
    End {
        ids_from: u64,
        store_entries: u64,
        records: u64,
        sha256: [u8; 32],
        /// [`khlang_keys::audit_chain::AuditSigner::sign_backup`] of `sha256`.
        signature: Vec<u8>,
    },
}

/// What a backup holds.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub header: BackupHeader,
    pub store_entries: u64,
    pub records: u64,
    pub audit_bytes: u64,
    pub bytes: u64,
    /// How long every commit was held off for the copy.
    pub held: std::time::Duration,
}

/// What the audit key signs: the file's SHA-256 and the End frame's own counts (the id floor a
/// restore sets is among them), so no byte that a restore acts on is left unsigned.
fn signed_digest(sha256: &[u8; 32], ids_from: u64, store_entries: u64, records: u64) -> [u8; 32] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(sha256);
    for n in [ids_from, store_entries, records] {
        h.update(&n.to_be_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

fn corrupt(what: &'static str) -> StoreError {
    StoreError::Corrupt(what)
}

struct Writer<W: Write> {
    out: W,
    hash: ring::digest::Context,
    bytes: u64,
}

impl<W: Write> Writer<W> {
    fn new(mut out: W) -> Result<Self, StoreError> {
        out.write_all(MAGIC).map_err(write_error)?;
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        hash.update(MAGIC);
        Ok(Self { out, hash, bytes: MAGIC.len() as u64 })
    }

    fn frame(&mut self, frame: &Frame) -> Result<(), StoreError> {
        let body = postcard::to_stdvec(frame).map_err(|_| corrupt("backup frame (encode)"))?;
        let len = u32::try_from(body.len()).map_err(|_| corrupt("backup frame (size)"))?;
        let len = len.to_be_bytes();
        if !matches!(frame, Frame::End { .. }) {
            self.hash.update(&len);
            self.hash.update(&body);
        }
        self.out.write_all(&len).and_then(|_| self.out.write_all(&body)).map_err(write_error)?;
        self.bytes += (len.len() + body.len()) as u64;
        Ok(())
    }

    fn digest(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.hash.clone().finish().as_ref());
        out
    }
}

fn write_error(e: std::io::Error) -> StoreError {
    StoreError::Io(format!("cannot write the backup: {e}"))
}

fn read_error(e: std::io::Error) -> StoreError {
    StoreError::Io(format!("cannot read the backup: {e}"))
}

/// Reads frames, hashing each, until the `End` frame, whose hash must match and whose signature
/// must verify under the operator's public key.
struct Reader<'k, R: Read> {
    input: R,
    hash: ring::digest::Context,
    done: bool,
    public_key: &'k [u8],
}

impl<'k, R: Read> Reader<'k, R> {
    fn new(mut input: R, public_key: &'k [u8]) -> Result<Self, VaultError> {
        let mut magic = [0u8; MAGIC.len()];
        input.read_exact(&mut magic).map_err(|_| not_a_backup())?;
        if magic[..9] != MAGIC[..9] {
            return Err(not_a_backup());
        }
        if magic[9] == 1 {
            return Err(VaultError::FailedPrecondition(
                "this backup has format 1, made before backups were signed: this build restores only signed \
                 backups (format 2); take a new backup with this build"
                    .into(),
            ));
        }
        if magic != *MAGIC {
            return Err(VaultError::FailedPrecondition(format!(
                "this backup has format {}; this build reads format {}",
                magic[9], MAGIC[9]
            )));
        }
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        hash.update(MAGIC);
        Ok(Self { input, hash, done: false, public_key })
    }

    /// The next frame; after `End` (checked), `None`.
    fn next(&mut self) -> Result<Option<Frame>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        self.input.read_exact(&mut len).map_err(|_| corrupt("backup (cut short: no end)"))?;
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_FRAME {
            return Err(corrupt("backup (a frame larger than any backup writes)"));
        }
        let mut body = vec![0u8; n];
        self.input.read_exact(&mut body).map_err(|_| corrupt("backup (cut short in a frame)"))?;
        let frame: Frame =
            postcard::from_bytes(&body).map_err(|_| corrupt("backup (a frame does not decode)"))?;
        if let Frame::End { sha256, signature, ids_from, store_entries, records } = &frame {
            if self.hash.clone().finish().as_ref() != sha256 {
                return Err(corrupt("backup (its checksum does not match: the file is damaged)"));
            }
            let signed = signed_digest(sha256, *ids_from, *store_entries, *records);
            if !khlang_keys::audit_chain::verify_backup(self.public_key, &signed, signature) {
                return Err(StoreError::Unauthentic {
                    what: "backup file".into(),
                    why: "its signature does not verify under the audit public key given: it was changed \
                          after the vault wrote it, or another vault wrote it",
                });
            }
            let mut rest = [0u8; 1];
            if self.input.read(&mut rest).map_err(read_error)? != 0 {
                return Err(corrupt("backup (bytes after its end)"));
            }
            self.done = true;
        } else {
            self.hash.update(&len);
            self.hash.update(&body);
        }
        Ok(Some(frame))
    }
}

fn not_a_backup() -> VaultError {
    VaultError::InvalidArgument("this file is not a khlang backup".into())
}

fn now_ms() -> u64 {
    crate::clock::now_ms()
}

impl Vault {
    /// Writes a backup of this vault to a file of its own (unnamed, in the data folder, gone when
    /// dropped) and returns it, at its end, with what it holds. Key admins only, and
    /// audited (the backup holds its own entry). Online: every commit — reads' entries too — is
    /// held off while the store and the log are copied (about a second per ~100,000 records
    /// here, bench/README.md), so the copy is one consistent state, its newest entry signed.
    pub async fn backup(
        self: &Arc<Self>,
        caller: &Caller,
    ) -> Result<(std::fs::File, BackupReport), VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::Backup, Operation::KeyAdmin, &regs);
        let regs_ref = &regs;
        self.audited(
            entry,
            prepare!(|e| {
                self.unsealed()?;
                self.permit(regs_ref, caller, Operation::KeyAdmin, e)?;
                if self.store.shared_chain().is_some() {
                    return Err(StoreError::NotSupported(
                        "a vault on PostgreSQL is backed up with pg_basebackup (README: Backup and \
                         restore), then checked with `khlangd verify`",
                    )
                    .into());
                }
                e.reason = "backup of the store and the audit log, commits held off".into();
                Ok(((), Changes::none()))
            }),
        )
        .await?;
        let public_key = hex::encode(
            self.audit
                .public_key()
                .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))?,
        );
        let folder = self.audit.dir().parent().unwrap_or(self.audit.dir()).to_owned();
        let out = tempfile::tempfile_in(&folder).map_err(write_error)?;
        let vault = self.clone();
        let runtime = tokio::runtime::Handle::current();
        let regulations_version = regs.version.clone();
        // Reading every key and file is blocking work: off the request workers.
        tokio::task::spawn_blocking(move || {
            runtime.block_on(async move {
                let commits_held = vault.audit.hold_commits().await;
                let holding = std::time::Instant::now();
                vault.audit.checkpoint_now().await?;
                vault.store.flush_now().await?;
                let header = BackupHeader {
                    created_ms: now_ms(),
                    backend: SLED.into(),
                    schema: SCHEMA_VERSION,
                    audit_seq: vault.audit.head().0,
                    audit_public_key: public_key,
                    regulations_version,
                };
                let mut w = Writer::new(std::io::BufWriter::with_capacity(1 << 20, out))?;
                w.frame(&Frame::Header(header.clone()))?;
                let mut store_entries = 0u64;
                let Snapshot { ids_from, records } = vault.store.snapshot(&mut |e: RawEntry| {
                    store_entries += 1;
                    w.frame(&Frame::Store { space: e.space, key: e.key, value: e.value })
                })?;
                let mut audit_bytes = 0u64;
                vault.audit.backup_files(&mut |name: &str, bytes: Vec<u8>| {
                    audit_bytes += bytes.len() as u64;
                    for chunk in bytes.chunks(AUDIT_CHUNK) {
                        w.frame(&Frame::AuditFile { name: name.to_owned(), bytes: chunk.to_vec() })?;
                    }
                    if bytes.is_empty() {
                        w.frame(&Frame::AuditFile { name: name.to_owned(), bytes: Vec::new() })?;
                    }
                    Ok(())
                })?;
                let sha256 = w.digest();
                let signature =
                    vault.audit.sign_backup(&signed_digest(&sha256, ids_from, store_entries, records))?;
                w.frame(&Frame::End { ids_from, store_entries, records, sha256, signature })?;
                // The copy is complete: commits go on while the file is flushed and synced.
                drop(commits_held);
                let held = holding.elapsed();
                let bytes = w.bytes;
                let file = w.out.into_inner().map_err(|e| write_error(e.into_error()))?;
                file.sync_all().map_err(write_error)?;
                Ok((file, BackupReport { header, store_entries, records, audit_bytes, bytes, held }))
            })
        })
        .await
        .map_err(|_| StoreError::Corrupt("backup task"))?
    }

    /// Opens every record's data key, subject id and field envelope (each plaintext dropped at
    /// once, never shown) and verifies the audit log: `khlangd verify`, on a stopped or restored
    /// vault. Recorded in the log as the operator's `VerifyVault`.
    pub async fn check_vault(&self) -> Result<VaultCheck, VaultError> {
        let keys = self.unsealed()?;
        let (mut records, mut fields, mut damaged, mut named) = (0u64, 0u64, 0u64, Vec::new());
        let mut cursor = Cursor::default();
        loop {
            let batch = self.store.walk(KeySpace::Records, &cursor, 512).await?;
            let Some(last) = batch.last() else { break };
            cursor = last.cursor.clone();
            for walked in &batch {
                let id = walked.record_id.as_str();
                let opened = async {
                    let Some((record, _)) = self.store.get_record(id).await? else { return Ok(0) };
                    let dek = self.unwrap_dek(&keys, id, &record.wrapped_key)?;
                    self.open_value(dek.as_ref(), id, SUBJECT_CONTEXT, &record.subject)?;
                    for f in &record.fields {
                        self.open_value(dek.as_ref(), id, &f.name, &f.envelope)?;
                    }
                    Ok::<u64, VaultError>(record.fields.len() as u64)
                }
                .await;
                match opened {
                    Ok(n) => {
                        records += 1;
                        fields += n;
                    }
                    Err(
                        e @ (VaultError::Integrity { .. } | VaultError::Storage(StoreError::Damaged { .. })),
                    ) => {
                        damaged += 1;
                        if named.len() < NAMED_DAMAGE {
                            named.push(e.to_string());
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let against_log = self.check_records().await?;
        // This process's own entries (the unseal's) are signed first, as a live verification does.
        self.audit.checkpoint_now().await?;
        let audit = self.verify_audit_now().await?;
        let mut entry = operator_entry(Rpc::VerifyVault, Operation::KeyAdmin, &self.regulations());
        entry.reason = format!(
            "{records} records opened ({fields} fields), {damaged} damaged; audit log {}",
            verdict_name(&audit.verdict())
        );
        if damaged > 0 || !against_log.holds() {
            entry.outcome = crate::Outcome::DataLoss;
        }
        self.commit_now(entry, Changes::none()).await?;
        Ok(VaultCheck { records, fields, damaged, named, audit, against_log })
    }
}

/// The verdict's one word.
pub fn verdict_name(v: &khlang_keys::audit_chain::Verdict) -> &'static str {
    use khlang_keys::audit_chain::Verdict;
    match v {
        Verdict::Intact => "intact",
        Verdict::Unverified(_) => "unverified",
        Verdict::Broken(_) => "broken",
    }
}

/// What [`Vault::check_vault`] found.
#[derive(Debug)]
pub struct VaultCheck {
    pub records: u64,
    pub fields: u64,
    pub damaged: u64,
    /// The first damaged records, by id and what failed (never a value).
    pub named: Vec<String>,
    /// The records against the log's puts, deletes and erasures.
    pub against_log: crate::audit::Completeness,
    pub audit: khlang_keys::audit_chain::ChainReport,
}

/// What a restore wrote.
#[derive(Debug)]
pub struct RestoreReport {
    pub header: BackupHeader,
    pub store_entries: u64,
    pub records: u64,
    pub audit_bytes: u64,
}

/// Restores the backup in `file` into `data_dir`, which must be empty or absent. The whole file
/// is checked (format, frames, checksum, and its signature under `public_key`, the vault's
/// audit public key as the operator holds it) before anything is written; if writing fails, what
/// was written is removed again.
pub fn restore(file: &Path, data_dir: &Path, public_key: &[u8]) -> Result<RestoreReport, VaultError> {
    // One private copy is checked and then restored: the file (or a FIFO, or a swap between the
    // two passes) cannot show the check one content and the restore another.
    let mut source = std::fs::File::open(file)
        .map_err(|e| VaultError::FailedPrecondition(format!("cannot read {}: {e}", file.display())))?;
    let beside = data_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut copy = tempfile::tempfile_in(beside).map_err(|e| {
        VaultError::FailedPrecondition(format!("cannot write a copy in {}: {e}", beside.display()))
    })?;
    std::io::copy(&mut source, &mut copy).map_err(read_error)?;
    let open = || {
        use std::io::Seek;
        let mut f = copy.try_clone().map_err(read_error)?;
        f.rewind().map_err(read_error)?;
        Ok::<_, VaultError>(std::io::BufReader::with_capacity(1 << 20, f))
    };
    let header = check(Reader::new(open()?, public_key)?)?;
    if header.backend != SLED {
        return Err(VaultError::FailedPrecondition(format!(
            "this backup is of a {} vault; khlangd restore writes sled",
            header.backend
        )));
    }
    if header.schema > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { found: header.schema, supported: SCHEMA_VERSION }.into());
    }
    let existed = data_dir.exists();
    if existed {
        let mut inside = std::fs::read_dir(data_dir).map_err(|e| {
            VaultError::FailedPrecondition(format!("cannot read {}: {e}", data_dir.display()))
        })?;
        if inside.next().is_some() {
            return Err(VaultError::FailedPrecondition(format!(
                "{} is not empty: restore into a new or empty folder",
                data_dir.display()
            )));
        }
    }
    let written = write_all(Reader::new(open()?, public_key)?, data_dir, header);
    if written.is_err() {
        for part in ["db", crate::audit::files::DIR] {
            let _ = std::fs::remove_dir_all(data_dir.join(part));
        }
        if !existed {
            let _ = std::fs::remove_dir(data_dir);
        }
    }
    written
}

/// Reads every frame (checking their order and the checksum) and returns the header.
fn check<R: Read>(mut r: Reader<'_, R>) -> Result<BackupHeader, VaultError> {
    let Some(Frame::Header(header)) = r.next()? else {
        return Err(corrupt("backup (no header)").into());
    };
    if hex::decode(&header.audit_public_key).ok().as_deref() != Some(r.public_key) {
        return Err(StoreError::Unauthentic {
            what: "backup file".into(),
            why: "it was made by a vault with another audit public key than the one given",
        }
        .into());
    }
    let mut in_audit = false;
    while let Some(frame) = r.next()? {
        match frame {
            Frame::Header(_) => return Err(corrupt("backup (a second header)").into()),
            Frame::Store { .. } if in_audit => return Err(corrupt("backup (frames out of order)").into()),
            Frame::Store { .. } | Frame::End { .. } => {}
            Frame::AuditFile { .. } => in_audit = true,
        }
    }
    Ok(header)
}

fn write_all<R: Read>(
    mut r: Reader<'_, R>,
    data_dir: &Path,
    header: BackupHeader,
) -> Result<RestoreReport, VaultError> {
    r.next()?; // the header, checked above
    let mut store = SledStore::restore_into(data_dir)?;
    let mut audit_bytes = 0u64;
    let mut last_file: Option<String> = None;
    let mut end = None;
    while let Some(frame) = r.next()? {
        match frame {
            Frame::Store { space, key, value } => store.put(RawEntry { space, key, value })?,
            Frame::AuditFile { name, bytes } => {
                let first = last_file.as_deref() != Some(name.as_str());
                crate::audit::files::restore_file(data_dir, &name, &bytes, first)?;
                audit_bytes += bytes.len() as u64;
                last_file = Some(name);
            }
            Frame::End { ids_from, store_entries, records, .. } => {
                end = Some((ids_from, store_entries, records))
            }
            Frame::Header(_) => return Err(corrupt("backup (a second header)").into()),
        }
    }
    let Some((ids_from, store_entries, records)) = end else { return Err(corrupt("backup (no end)").into()) };
    let written = store.finish(ids_from)?;
    if written != store_entries {
        return Err(corrupt("backup (fewer store entries than its end says)").into());
    }
    Ok(RestoreReport { header, store_entries, records, audit_bytes })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The vault's audit key in these tests (the operator gives restore its public half).
    fn signer() -> &'static khlang_keys::audit_chain::AuditSigner {
        static SIGNER: std::sync::OnceLock<khlang_keys::audit_chain::AuditSigner> =
            std::sync::OnceLock::new();
        SIGNER.get_or_init(|| {
            khlang_keys::DerivationKey::generate(&khlang_keys::OsRandom::new())
                .unwrap()
                .audit_signer()
                .unwrap()
        })
    }

    fn header(signer: &khlang_keys::audit_chain::AuditSigner) -> BackupHeader {
        BackupHeader {
            created_ms: 1,
            backend: SLED.into(),
            schema: SCHEMA_VERSION,
            audit_seq: 0,
            audit_public_key: hex::encode(signer.public_key()),
            regulations_version: String::new(),
        }
    }

    /// A backup around `frames`, checksummed and signed with the vault's audit key (so what is
    /// tested is what comes after the signature check).
    fn crafted(frames: Vec<Frame>) -> Vec<u8> {
        crafted_by(signer(), &header(signer()), frames)
    }

    /// As someone who knows the format would craft it, signed with `by`.
    fn crafted_by(
        by: &khlang_keys::audit_chain::AuditSigner,
        header: &BackupHeader,
        frames: Vec<Frame>,
    ) -> Vec<u8> {
        let mut w = Writer::new(Vec::new()).unwrap();
        w.frame(&Frame::Header(header.clone())).unwrap();
        let mut entries = 0;
        for f in &frames {
            if matches!(f, Frame::Store { .. }) {
                entries += 1;
            }
            w.frame(f).unwrap();
        }
        let sha256 = w.digest();
        let signature = by.sign_backup(&signed_digest(&sha256, 0, entries, 0)).unwrap();
        w.frame(&Frame::End { ids_from: 0, store_entries: entries, records: 0, sha256, signature }).unwrap();
        w.out
    }

    fn restore_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<RestoreReport, VaultError>) {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("b");
        std::fs::write(&file, bytes).unwrap();
        let result = restore(&file, &tmp.path().join("restored"), signer().public_key());
        (tmp, result)
    }

    /// A backup re-made and re-signed by anyone without this vault's audit key — naming that key
    /// or its own — and one from before backups were signed: refused, nothing written.
    #[test]
    fn a_backup_not_signed_by_this_vault_writes_nothing() {
        let frames = || vec![Frame::Store { space: "meta".into(), key: b"k".to_vec(), value: b"v".to_vec() }];
        let forger = khlang_keys::DerivationKey::generate(&khlang_keys::OsRandom::new())
            .unwrap()
            .audit_signer()
            .unwrap();
        let mut old = crafted(frames());
        old[9] = 1;
        // The End frame's id floor raised (the End frame is outside the checksum, not the
        // signature): the frame starts 4 + its length before the file's end.
        let mut floor = crafted(frames());
        let end_len = floor.len() - {
            let mut at = MAGIC.len();
            let mut last = at;
            while at < floor.len() {
                last = at;
                at += 4 + u32::from_be_bytes(floor[at..at + 4].try_into().unwrap()) as usize;
            }
            last
        };
        let end_at = floor.len() - end_len + 4;
        assert_eq!(floor[end_at], 3, "the End variant");
        assert_eq!(floor[end_at + 1], 0, "ids_from 0");
        floor[end_at + 1] = 100;
        for (what, bytes, says) in [
            (
                "signed by another key, naming ours",
                crafted_by(&forger, &header(signer()), frames()),
                "signature does not verify",
            ),
            (
                "signed by another key, naming it",
                crafted_by(&forger, &header(&forger), frames()),
                "another audit public key",
            ),
            ("format 1", old, "made before backups were signed"),
            ("id floor changed", floor, "signature does not verify"),
        ] {
            let (tmp, result) = restore_bytes(&bytes);
            let e = result.unwrap_err();
            assert!(e.to_string().contains(says), "{what}: {e}");
            assert!(!tmp.path().join("restored").exists(), "{what}: nothing written");
        }
        // A genuine file given another vault's public key: refused too.
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("b");
        std::fs::write(&file, crafted(frames())).unwrap();
        let e = restore(&file, &tmp.path().join("restored"), forger.public_key()).unwrap_err();
        assert!(matches!(e, VaultError::Storage(StoreError::Unauthentic { .. })), "{e:?}");
        assert!(!tmp.path().join("restored").exists());
    }

    #[test]
    fn a_crafted_backup_cannot_write_outside_the_log_or_the_store() {
        for (what, frame) in [
            (
                "a path out of the folder",
                Frame::AuditFile { name: "../../evil.log".into(), bytes: b"x".to_vec() },
            ),
            ("an absolute path", Frame::AuditFile { name: "/tmp/evil.log".into(), bytes: b"x".to_vec() }),
            (
                "a file the log does not have",
                Frame::AuditFile { name: "notes.txt".into(), bytes: b"x".to_vec() },
            ),
            (
                "an unknown key space",
                Frame::Store { space: "__sled__default".into(), key: vec![1], value: vec![2] },
            ),
        ] {
            let (tmp, result) = restore_bytes(&crafted(vec![frame]));
            assert!(result.is_err(), "{what}");
            assert!(!tmp.path().join("restored").exists(), "{what}: nothing left behind");
            assert!(!tmp.path().join("evil.log").exists(), "{what}");
        }
    }

    #[test]
    fn damaged_cut_oversized_and_foreign_files_are_refused_before_writing() {
        let value = b"ciphertext-ciphertext".to_vec();
        let good =
            crafted(vec![Frame::Store { space: "meta".into(), key: b"k".to_vec(), value: value.clone() }]);
        let (_tmp, ok) = restore_bytes(&good);
        assert_eq!(ok.unwrap().store_entries, 1);
        let mut flipped = good.clone();
        let at = good.windows(value.len()).position(|w| w == value.as_slice()).unwrap() + 3;
        flipped[at] ^= 1;
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut newer = good.clone();
        newer[9] = 3;
        for (what, bytes, says) in [
            ("flipped", flipped, "checksum"),
            ("cut", good[..good.len() - 1].to_vec(), "cut short"),
            ("huge frame", huge, "larger than"),
            ("newer format", newer, "format 3"),
            ("not a backup", b"hello".to_vec(), "not a khlang backup"),
        ] {
            let (tmp, result) = restore_bytes(&bytes);
            let e = result.unwrap_err().to_string();
            assert!(e.contains(says), "{what}: {e}");
            assert!(!tmp.path().join("restored").exists(), "{what}");
        }
    }
}
