//! Audit log verification speed: `cargo bench -p khlang-server --bench audit [ENTRIES]`.
//! Appends ENTRIES (default 1,000,000) realistic entries to a temporary audit log, then verifies the
//! chain and checkpoints as `khlang audit verify` does, and reports entries per second. The baseline
//! in the same run: iterating the same stored entries without hashing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is its failure report

use std::time::Instant;

use khlang_keys::{DerivationKey, OsRandom};
use khlang_server::audit::{AuditEntry, AuditLog, LogOptions, StoredRecords};
use khlang_server::storage::{Changes, Durability, SledStore};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
    let log = AuditLog::open(&store, dir.path(), &LogOptions::default()).await.unwrap();
    let key = DerivationKey::generate(&OsRandom::new()).unwrap();
    let public_key = key.audit_signer().unwrap().public_key().to_vec();
    log.unlock(&store, key.audit_signer().unwrap(), key.audit_tagger().unwrap(), key.audit_tagger().unwrap())
        .await
        .unwrap();

    let template = AuditEntry {
        rpc: "GetRecord".into(),
        operation: "read".into(),
        identity: "billing-clerk".into(),
        role: "billing-clerk".into(),
        peer: "127.0.0.1:52214".into(),
        request_id: "0b6f5d4e-8a43-4c4b-9a57-9a1e2f3c4d5e".into(),
        subject: "9f".repeat(32),
        record_id: "5129dd8b-42f7-496c-a74c-946cbf13ec5f".into(),
        fields: vec!["card_number".into(), "billing_address".into()],
        purpose: "billing".into(),
        decision: khlang_server::audit::Decided::Allow,
        rule: "roles.billing-clerk.read[0]".into(),
        regulations_version: "005d96b4a9019e1e3daddf79c2923509beb6b1a8786d9d48e67e30a7b91da4de".into(),
        key_versions: khlang_server::audit::KeyVersions::data_key(1, 1),
        outcome: khlang_server::Outcome::Ok,
        ..AuditEntry::default()
    };
    let t = Instant::now();
    for _ in 0..n {
        let _ = log.commit(&store, template.clone(), Changes::none()).await.unwrap();
    }
    log.checkpoint_now().await.unwrap();
    let bytes = template.canonical().unwrap().len();
    println!("appended {n} entries of ~{bytes} B in {:.1} s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let mut count = 0u64;
    for item in khlang_server::audit::files::entries(log.dir(), 0) {
        let (_, v) = item.unwrap();
        count += v.len() as u64 & 1;
    }
    let scan = t.elapsed().as_secs_f64();
    std::hint::black_box(count);

    let records = StoredRecords::read(&store).await.unwrap();
    let t = Instant::now();
    let report = log.verify(&records, &public_key, &[]).unwrap();
    let verify = t.elapsed().as_secs_f64();
    assert!(report.first_break.is_none(), "{report:?}");
    println!("baseline: iterate {n} stored entries        {:>10.0} entries/s", n as f64 / scan);
    println!(
        "verify: chain + {} checkpoints + head tags  {:>10.0} entries/s (target 1,000,000)",
        report.checkpoints,
        n as f64 / verify
    );
    println!("verify costs {:.2}x the bare iteration", verify / scan);
}
