//! Crypto cost of one 8-field record, and of the audit log's proofs: `cargo bench -p khlang-keys`.
//! Prints absolute times and the ratio to copying the same bytes (measured in the same run).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is its failure report

use std::hint::black_box;
use std::time::Instant;

use khlang_keys::*;

const FIELDS: &[(&str, &str)] = &[
    ("name", "สมชาย ใจดี"),
    ("email", "somchai.bench@example.go.th"),
    ("phone", "+66812345678"),
    ("home_address", "99/1 ถนนราชดำเนิน ตำบลในเมือง อำเภอเมืองนครศรีธรรมราช"),
    ("postal_code", "80000"),
    ("card_number", "4111111111111111"),
    ("billing_address", "99/1 Ratchadamnoen Rd, Nakhon Si Thammarat"),
    ("national_id", "1101700203450"),
];

fn time<T>(label: &str, iters: u32, mut f: impl FnMut() -> T) -> f64 {
    for _ in 0..iters / 10 {
        black_box(f());
    }
    let t = Instant::now();
    for _ in 0..iters {
        black_box(f());
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / f64::from(iters);
    println!("{label:<40} {us:8.3} µs");
    us
}

fn main() {
    let rng = OsRandom::new();
    let mut ring = KeyRing::new();
    ring.insert(Kek::generate(1, &rng).unwrap());
    let values: Vec<Plaintext> = FIELDS.iter().map(|(_, v)| Plaintext::from_str_copy(v)).collect();
    let id = b"5129dd8b-42f7-496c-a74c-946cbf13ec5f";
    let n = 50_000;

    let copy = time("baseline: copy 8 values", n, || {
        values.iter().map(|v| v.expose_secret().to_vec()).collect::<Vec<_>>()
    });
    let put = time("put: new data key, wrap, seal 8 fields", n, || {
        let dek = DataKey::generate(1, &rng).unwrap();
        let wrapped = ring.wrap_data_key(&dek, id, &rng).unwrap();
        let fields: Vec<(&str, &Plaintext)> = FIELDS.iter().map(|(f, _)| *f).zip(&values).collect();
        (wrapped, seal_fields(&dek, id, &fields, &rng).unwrap())
    });
    let dek = DataKey::generate(1, &rng).unwrap();
    let wrapped = ring.wrap_data_key(&dek, id, &rng).unwrap();
    let envs: Vec<_> = FIELDS
        .iter()
        .zip(&values)
        .map(|((f, _), v)| seal_field(&dek, FieldContext { record_id: id, field: f }, v, &rng).unwrap())
        .collect();
    let get = time("get: unwrap data key, open 8 fields", n, || {
        let dek = ring.unwrap_data_key(&wrapped, id).unwrap();
        FIELDS
            .iter()
            .zip(&envs)
            .map(|((f, _), e)| open_field(&dek, FieldContext { record_id: id, field: f }, e).unwrap())
            .collect::<Vec<_>>()
    });
    println!("put crypto = {:.1}x a plain copy; get crypto = {:.1}x", put / copy, get / copy);

    // The audit log's proofs: what a head tag costs against a signed checkpoint (issue 10 chose
    // tags for every group commit, signatures every 1000 entries).
    let key = DerivationKey::generate(&rng).unwrap();
    let (tagger, signer) = (key.audit_tagger().unwrap(), key.audit_signer().unwrap());
    let hash = [7u8; 32];
    let tag = time("audit: head tag (HMAC-SHA256)", n, || tagger.tag(42, &hash));
    let sign = time("audit: sign a checkpoint (Ed25519)", n / 10, || {
        signer.sign_checkpoint(42, &hash, 1, 41).unwrap()
    });
    let cp = signer.sign_checkpoint(42, &hash, 1, 41).unwrap();
    let verify = time("audit: verify a checkpoint", n / 10, || {
        audit_chain::verify_checkpoint(signer.public_key(), &cp)
    });
    println!("signing = {:.0}x a tag; verifying = {:.0}x a tag", sign / tag, verify / tag);
}
