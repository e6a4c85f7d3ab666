//! Cost of the decide step: `cargo bench -p khlang-server --bench policy`.
//! Prints ns per decision and the ratio to the crypto of the same read (open 2 fields), measured
//! in the same run.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is its failure report

use std::hint::black_box;
use std::time::Instant;

use khlang_keys::{DataKey, FieldContext, Kek, KeyRing, OsRandom, Plaintext, open_field, seal_fields};
use khlang_server::Identity;
use khlang_server::policy::regulations::Regulations;
use khlang_server::policy::{Ask, ConsentState, Operation, decide};

fn time<T>(label: &str, iters: u32, mut f: impl FnMut() -> T) -> f64 {
    for _ in 0..iters / 10 {
        black_box(f());
    }
    let t = Instant::now();
    for _ in 0..iters {
        black_box(f());
    }
    let ns = t.elapsed().as_secs_f64() * 1e9 / f64::from(iters);
    println!("{label:<52} {ns:9.0} ns");
    ns
}

fn main() {
    let regs = Regulations::sample();
    let clerk = Identity { name: "billing-clerk".into(), role: "billing-clerk".into() };
    let marketing = Identity { name: "marketing-officer".into(), role: "marketing-officer".into() };
    let app = Identity { name: "registration-app".into(), role: "registration-app".into() };
    let all: Vec<&str> = regs.fields.keys().map(String::as_str).collect();
    let n = 200_000;

    let rng = OsRandom::new();
    let mut ring = KeyRing::new();
    ring.insert(Kek::generate(1, &rng).unwrap());
    let dek = DataKey::generate(1, &rng).unwrap();
    let wrapped = ring.wrap_data_key(&dek, b"r", &rng).unwrap();
    let (card, addr) =
        (Plaintext::from_str_copy("4111111111111111"), Plaintext::from_str_copy("99 Ratchadamnoen"));
    let envs = seal_fields(&dek, b"r", &[("card_number", &card), ("billing_address", &addr)], &rng).unwrap();
    let crypto = time("baseline: unwrap data key + open 2 fields", n, || {
        let dek = ring.unwrap_data_key(&wrapped, b"r").unwrap();
        let a = open_field(&dek, FieldContext { record_id: b"r", field: "card_number" }, &envs[0]).unwrap();
        let b =
            open_field(&dek, FieldContext { record_id: b"r", field: "billing_address" }, &envs[1]).unwrap();
        (a, b)
    });
    let billing = time("decide: billing-clerk, 2 fields, billing", n, || {
        let ask = Ask {
            op: Operation::Read,
            fields: &["card_number", "billing_address"],
            purpose: Some("billing"),
            consent: None,
        };
        decide(&regs, &clerk, ask).unwrap()
    });
    time("decide: marketing-officer, 2 fields, with consent", n, || {
        let ask = Ask {
            op: Operation::Read,
            fields: &["name", "email"],
            purpose: Some("marketing"),
            consent: Some(ConsentState::Granted),
        };
        decide(&regs, &marketing, ask).unwrap()
    });
    time("decide: registration-app, all 19 fields, masked", n, || {
        let ask = Ask { op: Operation::Read, fields: &all, purpose: Some("contact"), consent: None };
        decide(&regs, &app, ask).unwrap()
    });
    time("decide: refused (postal field for billing)", n, || {
        let ask = Ask {
            op: Operation::Read,
            fields: &["card_number", "name"],
            purpose: Some("billing"),
            consent: None,
        };
        decide(&regs, &clerk, ask).unwrap_err()
    });
    println!("decision = {:.2}x the crypto of the same 2-field read", billing / crypto);
}
