//! The access log against someone who can write the data folder of a stopped vault: each attack
//! of the issue, sent as an intruder with a shell would, and for each: verification fails naming
//! the first entry that can no longer be trusted, the restarted vault reports the break (and
//! refuses data requests) but never signs over it, and the bytes after the damage stay on disk.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::path::{Path, PathBuf};

use khlang_client::{Code, Verdict};
use khlang_server::VaultOptions;
use khlang_server::audit::files::FileOptions;
use khlang_server::audit::{AuditFilter, LogState, VerifyWith, verify_dir};
use khlang_tests::*;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn options(dir: &Path, files: FileOptions, accept: Option<u64>) -> VaultOptions {
    VaultOptions { audit_files: files, accept_audit_break: accept, ..TestServer::options(dir) }
}

/// Some reads and writes, then a clean stop (which signs the head).
async fn traffic(dir: &Path, files: &FileOptions, rounds: usize) -> String {
    let server = TestServer::start_with(dir, options(dir, files.clone(), None)).await;
    let mut c = server.client().await;
    for i in 0..rounds {
        let id = c.put(&format!("p{i}"), [("age", "30")]).await.unwrap();
        c.get(&id, &[], PURPOSE).await.unwrap();
    }
    let key = server.client_as("security-officer").await.audit_public_key().await.unwrap();
    server.stop().await;
    key
}

/// The segment files' lines, as an intruder edits them.
struct Log {
    files: Vec<(PathBuf, Vec<String>)>,
}

impl Log {
    fn open(data: &Path) -> Self {
        let files = khlang_server::audit::files::segments(&data.join("audit"))
            .unwrap()
            .into_iter()
            .map(|(_, path)| {
                let bytes = std::fs::read(&path).unwrap();
                let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
                let text = String::from_utf8(bytes[..end].to_vec()).unwrap();
                (path, text.lines().map(str::to_owned).collect())
            })
            .collect();
        Self { files }
    }

    fn lines(&self) -> impl Iterator<Item = &String> {
        self.files.iter().flat_map(|(_, l)| l)
    }

    fn find(&self, seq: u64) -> (usize, usize) {
        let prefix = format!("e {seq} ");
        for (f, (_, lines)) in self.files.iter().enumerate() {
            if let Some(i) = lines.iter().position(|l| l.starts_with(&prefix)) {
                return (f, i);
            }
        }
        panic!("no entry {seq}");
    }

    fn entry(&self, seq: u64) -> (String, String) {
        let (f, i) = self.find(seq);
        let mut parts = self.files[f].1[i].splitn(4, ' ').skip(2);
        (parts.next().unwrap().to_owned(), parts.next().unwrap().to_owned())
    }

    fn line_mut(&mut self, seq: u64) -> &mut String {
        let (f, i) = self.find(seq);
        &mut self.files[f].1[i]
    }

    fn last_seq(&self) -> u64 {
        self.lines().filter_map(|l| l.strip_prefix("e ")?.split(' ').next()?.parse().ok()).max().unwrap()
    }

    /// Seqs of the head tags (`m` lines).
    fn tags(&self) -> Vec<u64> {
        self.lines().filter_map(|l| l.strip_prefix("m ")?.split(' ').next()?.parse().ok()).collect()
    }

    /// The forger's edit: entry `seq` says the read was refused, and every hash from it on is
    /// recomputed (SHA-256 needs no key). Returns the forged head's hash.
    fn rechain_from(&mut self, seq: u64) -> String {
        let mut prev: [u8; 32] = hex::decode(self.entry(seq - 1).0).unwrap().try_into().unwrap();
        for s in seq..=self.last_seq() {
            let (_, json) = self.entry(s);
            let json = if s == seq {
                json.replace("\"outcome\":\"Ok\"", "\"outcome\":\"PermissionDenied\"")
            } else {
                json
            };
            prev = khlang_keys::audit_chain::chain_hash(&prev, json.as_bytes());
            *self.line_mut(s) = format!("e {s} {} {json}", hex::encode(prev));
        }
        hex::encode(prev)
    }

    fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        for (_, lines) in &mut self.files {
            lines.retain(|l| keep(l));
        }
    }

    fn save(&self) {
        for (path, lines) in &self.files {
            std::fs::write(path, lines.join("\n") + "\n").unwrap();
        }
    }

    /// Every byte the intruder left is still on disk: each file still starts with them.
    fn assert_still_on_disk(&self) {
        for (path, lines) in &self.files {
            let now = std::fs::read(path).unwrap();
            let left = (lines.join("\n") + "\n").into_bytes();
            assert!(
                now.starts_with(&left),
                "{}: the bytes after the damage were cut or overwritten",
                path.display()
            );
        }
    }
}

/// The first seq a rechain from `seq` makes untrustworthy: the one after the last head tag or
/// signed checkpoint before it (the forger recomputed everything after that).
fn after_last_proof_before(log: &Log, checkpoints: &[u64], seq: u64) -> u64 {
    log.tags().into_iter().chain(checkpoints.iter().copied()).filter(|s| *s < seq).max().unwrap_or(0) + 1
}

fn checkpoint_seqs(data: &Path) -> Vec<u64> {
    let path = data.join("audit").join("checkpoints.log");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().filter_map(|l| l.strip_prefix("c ")?.split(' ').next()?.parse().ok()).collect()
}

/// Verification with only the public key and the files (what `verify --offline` sees of them).
fn verify_files(data: &Path, key: &str) -> Verdict {
    verify_dir(&data.join("audit"), &hex::decode(key).unwrap(), &VerifyWith::default()).unwrap().verdict()
}

/// A service's health as the server reports it, once it has had time to see the log's state.
async fn health(url: String, service: &str) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();
    let mut client = HealthClient::new(channel);
    let mut status = ServingStatus::Unknown;
    for _ in 0..40 {
        let request = HealthCheckRequest { service: service.into() };
        status = client.check(request).await.unwrap().into_inner().status();
        if status != ServingStatus::Serving || service == "khlang.v1.Audit" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    status
}

/// The break the vault reports: at once for its tail, within seconds for older history (verified
/// beside serving).
async fn broken_soon(server: &TestServer) -> khlang_server::audit::BreakRecord {
    for _ in 0..100 {
        if let LogState::Broken(b) = server.vault().audit_state() {
            return b;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the restarted vault did not see the damage");
}

/// Restarts the vault on the damaged folder and checks what it must do; returns the seq of the
/// `AuditBreak` entry that carried the damage forward.
async fn assert_caught(
    data: &Path,
    files: &FileOptions,
    first_bad: u64,
    forged: &Log,
    forged_head: Option<(u64, &str)>,
) -> u64 {
    let server = TestServer::start_with(data, options(data, files.clone(), None)).await;
    let b = broken_soon(&server).await;
    assert_eq!(b.damaged_from, first_bad, "{b:?}");
    // Health says so: the server and its data services answer NOT_SERVING, the audit service serves.
    assert_eq!(health(server.url(), "").await, ServingStatus::NotServing);
    assert_eq!(health(server.url(), "khlang.v1.Records").await, ServingStatus::NotServing);
    assert_eq!(health(server.url(), "khlang.v1.Audit").await, ServingStatus::Serving);
    // Fail closed: no personal data moves while the record of who saw it is in doubt.
    let e = server.client().await.put("after-the-break", [("age", "40")]).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
    assert!(e.to_string().contains(&format!("--accept-audit-break {}", b.entry)), "{e}");
    // Live verification over gRPC names the first untrustworthy entry.
    let mut sec = server.client_as("security-officer").await;
    let live = sec.verify_audit(&[]).await.unwrap();
    assert!(live.break_open);
    assert!(matches!(&live.verdict, Verdict::Broken(x) if x.seq == first_bad), "{live:?}");
    // The log itself carries the break forward, readable by officers.
    let entries: Vec<_> = server.audit_entries();
    let carried = entries.iter().find(|e| e.rpc == "AuditBreak").expect("an AuditBreak entry");
    assert_eq!((carried.seq, carried.damaged_from), (b.entry, first_bad));
    // Offline, with only the public key, an export says the same and verifies on past the break:
    // what the vault signed after it extends what it signed before.
    let key = sec.audit_public_key().await.unwrap();
    let mut lines = Vec::new();
    sec.export_audit(|l| lines.push(l.to_owned())).await.unwrap();
    let offline = khlang_client::verify_export(lines.join("\n").as_bytes(), &key, &[]).unwrap();
    assert_eq!(offline.first_break.as_ref().map(|x| x.seq), Some(first_bad), "{offline:?}");
    assert_eq!(offline.resumed_at, vec![b.entry], "{offline:?}");
    assert!(offline.last_checkpoint > b.entry, "{offline:?}");
    server.stop().await;
    // Nothing was signed over the forgery, and nothing of it was cut or overwritten.
    if let Some((seq, hash)) = forged_head {
        let cps = std::fs::read_to_string(data.join("audit").join("checkpoints.log")).unwrap_or_default();
        assert!(
            !cps.lines().any(|l| l.starts_with(&format!("c {seq} ")) && l.contains(hash)),
            "the forged head was signed"
        );
    }
    forged.assert_still_on_disk();
    b.entry
}

/// (a) Delete the checkpoints file, edit an entry and recompute the chain after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rechained_log_without_its_checkpoints_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("v");
    let files = FileOptions::default();
    let key = traffic(&data, &files, 15).await;
    std::fs::remove_file(data.join("audit").join("checkpoints.log")).unwrap();
    let mut log = Log::open(&data);
    let forged = log.rechain_from(10);
    log.save();
    let first_bad = after_last_proof_before(&log, &[], 10);
    assert!(first_bad <= 10);
    // With only the public key and no checkpoint left, nothing is proven: unverified, never intact.
    assert!(matches!(verify_files(&data, &key), Verdict::Unverified(_)));
    let entry = assert_caught(&data, &files, first_bad, &log, Some((log.last_seq(), &forged))).await;

    // The operator accepts the break by naming it: recorded, and data requests are served again.
    let server = TestServer::start_with(&data, options(&data, files.clone(), Some(entry))).await;
    assert_eq!(server.vault().audit_state(), LogState::Intact);
    server.client().await.put("after-acceptance", [("age", "41")]).await.unwrap();
    let entries: Vec<_> = server.audit_entries();
    assert!(entries.iter().any(|e| e.rpc == "AcceptAuditBreak" && e.reason.contains(&entry.to_string())));
    // The history keeps its hole: verification still names it, and verifies on after it.
    let live = server.client_as("security-officer").await.verify_audit(&[]).await.unwrap();
    assert!(!live.break_open);
    assert!(matches!(&live.verdict, Verdict::Broken(x) if x.seq == first_bad), "{live:?}");
    assert_eq!(live.report.resumed_at, vec![entry]);
    server.stop().await;
    // Carried forward and accepted once: later starts (and their history check) do not raise it again.
    let server = TestServer::start_with(&data, options(&data, files.clone(), None)).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(server.vault().audit_state(), LogState::Intact);
    let breaks = server
        .vault()
        .audit_entries(khlang_server::AuditGrant::unaudited_for_tests(AuditFilter::default()))
        .filter(|e| e.as_ref().unwrap().rpc == "AuditBreak");
    assert_eq!(breaks.count(), 1);
    server.client().await.put("later", [("age", "42")]).await.unwrap();
    server.stop().await;
}

/// (a') The same, with the head tags stripped too: the store's record of the last signed head
/// still catches it, and nothing before it can be trusted any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rechained_log_without_checkpoints_or_tags_is_caught_by_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("v");
    let files = FileOptions::default();
    traffic(&data, &files, 10).await;
    std::fs::remove_file(data.join("audit").join("checkpoints.log")).unwrap();
    let mut log = Log::open(&data);
    log.retain(|l| !l.starts_with("m "));
    let forged = log.rechain_from(10);
    log.save();
    assert_caught(&data, &files, 1, &log, Some((log.last_seq(), &forged))).await;
}

/// (c) Cut the newest entries together with their tags and checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_tail_and_its_checkpoints_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("v");
    let files = FileOptions::default();
    let key = traffic(&data, &files, 15).await;
    // The cut starts at a read's entry: a change's entry is also in sled, which puts it back at
    // open (a crash's loss, not an attack).
    let cut = 31;
    let below = |l: &str| l.split(' ').nth(1).and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s < cut);
    let mut log = Log::open(&data);
    log.retain(below);
    log.save();
    let cps = data.join("audit").join("checkpoints.log");
    let kept: Vec<String> =
        std::fs::read_to_string(&cps).unwrap().lines().filter(|l| below(l)).map(str::to_owned).collect();
    std::fs::write(&cps, kept.join("\n") + if kept.is_empty() { "" } else { "\n" }).unwrap();
    // The files alone look like a shorter log.
    assert!(!matches!(verify_files(&data, &key), Verdict::Broken(_)));
    assert_caught(&data, &files, cut, &log, None).await;
}

/// (d) One NUL byte at the start of a line in the middle of a segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_byte_in_the_middle_is_damage_not_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("v");
    let files = FileOptions::default();
    let key = traffic(&data, &files, 15).await;
    let mut log = Log::open(&data);
    log.line_mut(12).replace_range(0..1, "\0");
    log.save();
    assert!(matches!(verify_files(&data, &key), Verdict::Broken(b) if b.seq == 12));
    let entry = assert_caught(&data, &files, 12, &log, None).await;
    // New entries went after every byte: the entries after the NUL keep their seqs, once each.
    let after = Log::open(&data);
    let seqs: Vec<u64> =
        after.lines().filter_map(|l| l.strip_prefix("e ")?.split(' ').next()?.parse().ok()).collect();
    let mut unique = seqs.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(seqs.len(), unique.len(), "no seq written twice");
    assert!(seqs.contains(&entry));
}

/// (e) A garbled (short) line in the middle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_line_in_the_middle_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("v");
    let files = FileOptions::default();
    let key = traffic(&data, &files, 15).await;
    let mut log = Log::open(&data);
    *log.line_mut(12) = "e 12 00".into();
    log.save();
    assert!(matches!(verify_files(&data, &key), Verdict::Broken(b) if b.seq == 12));
    assert_caught(&data, &files, 12, &log, None).await;
}

/// (f) Two segment files swapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_segment_files_are_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("v");
    let files = FileOptions { segment_entries: 10, ..FileOptions::default() };
    let key = traffic(&data, &files, 20).await;
    let segments = khlang_server::audit::files::segments(&data.join("audit")).unwrap();
    assert!(segments.len() >= 4, "{segments:?}");
    let (a, b) = (&segments[1], &segments[2]);
    let (ta, tb) = (std::fs::read(&a.1).unwrap(), std::fs::read(&b.1).unwrap());
    std::fs::write(&a.1, &tb).unwrap();
    std::fs::write(&b.1, &ta).unwrap();
    let log = Log::open(&data);
    assert!(
        matches!(verify_files(&data, &key), Verdict::Broken(x) if x.seq == a.0),
        "{:?}",
        verify_files(&data, &key)
    );
    assert_caught(&data, &files, a.0, &log, None).await;
}

/// (g) The whole folder rolled back to an earlier copy: nothing inside it can tell, the witness
/// outside it can — at the vault's start, and for `verify --witness`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_folder_is_caught_only_with_the_witness() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("v");
    let elsewhere = tempfile::tempdir().unwrap();
    let witness_path = elsewhere.path().join("witness.jsonl");
    let files = FileOptions { witness: Some(witness_path.clone()), ..FileOptions::default() };
    traffic(&data, &files, 5).await;
    let earlier = tmp.path().join("earlier");
    copy_tree(&data, &earlier);
    traffic(&data, &files, 5).await;
    std::fs::remove_dir_all(&data).unwrap();
    copy_tree(&earlier, &data);
    let witness =
        khlang_client::read_witness(std::io::BufReader::new(std::fs::File::open(&witness_path).unwrap()))
            .unwrap();
    let witnessed_after = witness.last().unwrap().seq;

    // Without the witness the restored copy looks sound (it is a log the vault once had).
    let plain = FileOptions::default();
    let server = TestServer::start_with(&data, options(&data, plain.clone(), None)).await;
    assert_eq!(server.vault().audit_state(), LogState::Intact);
    let mut sec = server.client_as("security-officer").await;
    assert!(matches!(sec.verify_audit(&[]).await.unwrap().verdict, Verdict::Intact));
    // `khlang audit verify --witness`: the client checks the witness's signatures, the vault that
    // its log holds every witnessed head.
    let key = sec.audit_public_key().await.unwrap();
    let heads = khlang_client::witnessed_heads(&witness, &key).unwrap();
    let live = sec.verify_audit(&heads).await.unwrap();
    assert!(matches!(&live.verdict, Verdict::Broken(_)), "{live:?}");
    // Offline too: an export of the rolled-back log against the witness.
    let mut lines = Vec::new();
    sec.export_audit(|l| lines.push(l.to_owned())).await.unwrap();
    let offline = khlang_client::verify_export(lines.join("\n").as_bytes(), &key, &witness).unwrap();
    assert!(offline.first_break.is_some(), "{offline:?}");
    // A forged witness line is refused, not trusted.
    let mut fake = witness.clone();
    fake[0].hash[0] ^= 1;
    assert!(khlang_client::witnessed_heads(&fake, &key).is_err());
    server.stop().await;

    // With the witness configured, the vault itself sees the rollback when it starts.
    std::fs::remove_dir_all(&data).unwrap();
    copy_tree(&earlier, &data);
    let log = Log::open(&data);
    let server = TestServer::start_with(&data, options(&data, files.clone(), None)).await;
    let b = broken_soon(&server).await;
    assert!(b.damaged_from <= witnessed_after && b.entry > witnessed_after, "{b:?}");
    server.stop().await;
    log.assert_still_on_disk();
}

/// (b) After a crash (kill -9: no final checkpoint), rewrite only the entries after the last
/// signed checkpoint: the head tags written with each acknowledged group catch it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_the_unsigned_tail_after_a_crash_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let args = ["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()];
    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let mut app = khlang_client::Client::connect(&url, &dev_token(&data, "registration-app")).await.unwrap();
    let id = app.put("tail", [("email", CANARY_EMAIL)]).await.unwrap();
    for _ in 0..30 {
        app.get(&id, &[], Some("contact")).await.unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let signed = checkpoint_seqs(&data);
    let mut log = Log::open(&data);
    let last = log.last_seq();
    let target = last - 5;
    assert!(signed.iter().all(|s| *s < target), "the tail is unsigned: {signed:?} < {target}");
    let forged = log.rechain_from(target);
    log.save();
    let first_bad = after_last_proof_before(&log, &signed, target);
    assert!(first_bad > *signed.iter().max().unwrap_or(&0));

    let (child, url, server_log) = spawn_khlangd_logged(&args, "info");
    let url = url.unwrap();
    let mut sec = khlang_client::Client::connect(&url, &dev_token(&data, "security-officer")).await.unwrap();
    let live = sec.verify_audit(&[]).await.unwrap();
    assert!(live.break_open && matches!(&live.verdict, Verdict::Broken(b) if b.seq == first_bad), "{live:?}");
    let mut app = khlang_client::Client::connect(&url, &dev_token(&data, "registration-app")).await.unwrap();
    assert_eq!(app.get(&id, &[], Some("contact")).await.unwrap_err().code(), Some(Code::FailedPrecondition));
    drop(child);
    let logged = server_log.recv_timeout(std::time::Duration::from_secs(10)).unwrap().unwrap_err();
    assert!(logged.contains("AUDIT LOG DAMAGED") && logged.contains("ERROR"), "{logged}");
    let cps = std::fs::read_to_string(data.join("audit").join("checkpoints.log")).unwrap();
    assert!(!cps.contains(&forged), "the forged head was signed");
    log.assert_still_on_disk();
}

/// An honest crash — kill -9 with reads and writes in flight — is not damage: after the restart
/// the log verifies intact and nothing is reported broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_appends_still_verifies_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let args = ["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()];
    for round in 0..3 {
        let (mut child, url) = spawn_khlangd(&args);
        let url = url.unwrap();
        let token = dev_token(&data, "registration-app");
        let mut app = khlang_client::Client::connect(&url, &token).await.unwrap();
        let id = app.put("crash", [("email", CANARY_EMAIL)]).await.unwrap();
        let mut load = Vec::new();
        for w in 0..4 {
            let (url, token, id) = (url.clone(), token.clone(), id.clone());
            load.push(tokio::spawn(async move {
                let mut c = khlang_client::Client::connect(&url, &token).await.unwrap();
                loop {
                    if w % 2 == 0 {
                        if c.get(&id, &[], Some("contact")).await.is_err() {
                            break;
                        }
                    } else if c.put("crash", [("age", "30")]).await.is_err() {
                        break;
                    }
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(300 + 150 * round)).await;
        child.kill().unwrap(); // SIGKILL with requests in flight
        child.wait().unwrap();
        for l in load {
            l.await.unwrap();
        }
    }
    let (_child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let mut sec = khlang_client::Client::connect(&url, &dev_token(&data, "security-officer")).await.unwrap();
    let live = sec.verify_audit(&[]).await.unwrap();
    assert!(!live.break_open && matches!(live.verdict, Verdict::Intact), "{live:?}");
    let all = sec.query_audit(&khlang_client::AuditQuery::default()).await.unwrap();
    assert!(!all.iter().any(|e| e.rpc == "AuditBreak"), "an honest crash is not reported as damage");
}
