//! Known-answer and tamper tests for Khlang's own formats.

use ring::aead as ring_aead;

use crate::hierarchy::test_support::*;
use crate::seal::seal_with;
use crate::*;

/// Deterministic bytes for vectors; never used outside tests.
struct Counter(std::sync::atomic::AtomicU8);
impl RandomSource for Counter {
    fn fill(&self, dest: &mut [u8]) -> Result<(), KeyError> {
        for b in dest {
            *b = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
}

fn dek(generation: u32) -> DataKey {
    DataKey::from_parts(generation, Key256::from_slice(&[0x11; 32]).unwrap()).unwrap()
}

const CTX: FieldContext<'static> = FieldContext { record_id: b"rec-0001", field: "email" };

/// Fixed key + fixed nonce → these exact bytes. If this changes, stored data becomes unreadable.
const FIELD_KAT: &str = "01000000012a2a2a2a2a2a2a2a2a2a2a2a";

fn kat_envelope() -> Vec<u8> {
    crate::hierarchy::seal_field_with_nonce(&dek(1), CTX, b"somchai@example.go.th", &[0x2a; 12]).unwrap()
}

#[test]
fn field_envelope_known_answer() {
    let env = kat_envelope();
    let hex_env = hex::encode(&env);
    assert_eq!(&hex_env[..FIELD_KAT.len()], FIELD_KAT, "header: format, generation, nonce");
    assert_eq!(hex_env, FIELD_ENVELOPE_KAT_FULL);
}

/// The header reader gives the generation of the known-answer envelope (1) and refuses what is
/// not a version-1 envelope, without any key.
#[test]
fn envelope_generation_reads_the_header_only() {
    let env = kat_envelope();
    assert_eq!(envelope_generation(&env).unwrap(), 1);
    let mut later = env.clone();
    later[1..5].copy_from_slice(&7u32.to_be_bytes());
    assert_eq!(envelope_generation(&later).unwrap(), 7);
    assert!(matches!(envelope_generation(&[]), Err(KeyError::Malformed(_))));
    assert!(matches!(
        envelope_generation(&[2, 0, 0, 0, 1]),
        Err(KeyError::UnsupportedFormat { version: 2, .. })
    ));
    assert!(envelope_generation(&[1, 0, 0]).is_err(), "a cut header");
}

const FIELD_ENVELOPE_KAT_FULL: &str = include_str!("../testdata/field_envelope_v1.hex").trim_ascii();

#[test]
fn field_envelope_is_standard_aes_256_gcm() {
    // An independent implementation (ring) opens our envelope with the documented AAD layout.
    let env = kat_envelope();
    let key = ring_aead::LessSafeKey::new(
        ring_aead::UnboundKey::new(&ring_aead::AES_256_GCM, &[0x11; 32]).unwrap(),
    );
    let nonce = ring_aead::Nonce::try_assume_unique_for_key(&env[5..17]).unwrap();
    let mut aad = b"khlang/v1/field".to_vec();
    aad.extend_from_slice(&[1, 0, 0, 0, 1]);
    aad.extend_from_slice(&8u32.to_be_bytes());
    aad.extend_from_slice(b"rec-0001");
    aad.extend_from_slice(&5u32.to_be_bytes());
    aad.extend_from_slice(b"email");
    assert_eq!(aad, field_aad_for(CTX, 1));
    let mut buf = env[17..].to_vec();
    let plain = key.open_in_place(nonce, ring_aead::Aad::from(&aad), &mut buf).unwrap();
    assert_eq!(plain, b"somchai@example.go.th");
}

#[test]
fn field_round_trip_with_random_nonces() {
    let rng = OsRandom::new();
    let value = Plaintext::from_str_copy("สมชาย ใจดี");
    let a = seal_field(&dek(1), CTX, &value, &rng).unwrap();
    let b = seal_field(&dek(1), CTX, &value, &rng).unwrap();
    assert_ne!(a, b, "fresh nonce each time");
    assert_eq!(open_field(&dek(1), CTX, &a).unwrap(), value);
    assert_eq!(open_field(&dek(1), CTX, &b).unwrap(), value);
}

#[test]
fn tamper_every_bit_fails() {
    let env = kat_envelope();
    for i in 0..env.len() * 8 {
        let mut t = env.clone();
        t[i / 8] ^= 1 << (i % 8);
        let err = open_field(&dek(1), CTX, &t).unwrap_err();
        assert!(
            matches!(err, KeyError::Integrity(_) | KeyError::UnsupportedFormat { .. }),
            "bit {i}: {err:?}"
        );
    }
}

#[test]
fn tamper_moved_to_other_record_or_field_fails() {
    let env = kat_envelope();
    let other_record = FieldContext { record_id: b"rec-0002", field: "email" };
    let other_field = FieldContext { record_id: b"rec-0001", field: "name" };
    assert_eq!(open_field(&dek(1), other_record, &env), Err(KeyError::Integrity("field envelope")));
    assert_eq!(open_field(&dek(1), other_field, &env), Err(KeyError::Integrity("field envelope")));
    // A re-encrypted record's newer data key does not accept an old-generation envelope.
    assert_eq!(open_field(&dek(2), CTX, &env), Err(KeyError::Integrity("field envelope")));
    // Truncated and empty.
    assert!(open_field(&dek(1), CTX, &env[..10]).is_err());
    assert!(open_field(&dek(1), CTX, &[]).is_err());
}

#[test]
fn data_key_wrap_known_answer_and_binding() {
    let kek = kek_from(3, &[0x22; 32]);
    let w = wrap_data_key_with_nonce(&kek, &dek(1), b"rec-0001", &[0x33; 12]).unwrap();
    assert_eq!(w.header().unwrap(), (3, 1));
    assert_eq!(hex::encode(w.as_bytes()), include_str!("../testdata/data_key_wrap_v1.hex").trim_ascii());
    let back = kek.unwrap_data_key(&w, b"rec-0001").unwrap();
    assert_eq!(back.generation(), 1);
    // Bound to its record.
    assert_eq!(kek.unwrap_data_key(&w, b"rec-0002").unwrap_err(), KeyError::Integrity("wrapped data key"));
    // Another KEK version is refused before any decryption.
    let other = kek_from(4, &[0x22; 32]);
    assert_eq!(other.unwrap_data_key(&w, b"rec-0001").unwrap_err(), KeyError::UnknownKekVersion(3));
    // A forged header claiming another generation fails.
    let mut forged = w.as_bytes().to_vec();
    forged[8] ^= 1;
    let forged = WrappedDataKey::from_bytes(forged);
    assert!(kek.unwrap_data_key(&forged, b"rec-0001").is_err());
}

#[test]
fn key_ring_uses_active_and_opens_old_versions() {
    let rng = OsRandom::new();
    let mut ring = KeyRing::new();
    ring.insert(Kek::generate(1, &rng).unwrap());
    let w1 = ring.wrap_data_key(&dek(1), b"r", &rng).unwrap();
    ring.insert(Kek::generate(2, &rng).unwrap());
    let w2 = ring.wrap_data_key(&dek(1), b"r", &rng).unwrap();
    assert_eq!(w1.kek_version().unwrap(), 1);
    assert_eq!(w2.kek_version().unwrap(), 2);
    assert_eq!(ring.active_version(), Some(2));
    assert!(ring.unwrap_data_key(&w1, b"r").is_ok());
    assert!(ring.unwrap_data_key(&w2, b"r").is_ok());
}

#[test]
fn kek_wrap_round_trip_and_version_binding() {
    let rng = OsRandom::new();
    let root = RootKey::generate(&rng).unwrap();
    let kek = Kek::generate(7, &rng).unwrap();
    let mut wrapped = root.wrap_kek(&kek, &rng).unwrap();
    assert_eq!(root.unwrap_kek(&wrapped).unwrap().version(), 7);
    wrapped[4] = 8; // claim version 8
    assert_eq!(root.unwrap_kek(&wrapped).unwrap_err(), KeyError::Integrity("wrapped key-encryption key"));
}

#[test]
fn root_seal_known_answer_and_wrong_passphrase() {
    let root = RootKey::from_key(Key256::from_slice(&[0x44; 32]).unwrap());
    let sealed = seal_with(&root, b"correct horse", SealParams::MINIMUM, &[0x55; 16], &[0x66; 12]).unwrap();
    assert_eq!(hex::encode(&sealed), include_str!("../testdata/root_seal_v1.hex").trim_ascii());
    let back = unseal_root_key(&sealed, b"correct horse").unwrap();
    assert_eq!(back.key().expose_secret(), &[0x44; 32]);
    assert_eq!(unseal_root_key(&sealed, b"wrong horse").unwrap_err(), KeyError::WrongPassphrase);
}

#[test]
fn root_seal_refuses_weak_or_lowered_parameters() {
    let rng = Counter(0.into());
    let root = RootKey::generate(&rng).unwrap();
    let weak = SealParams { m_cost: 1024, t_cost: 1, p_cost: 1 };
    assert!(matches!(seal_root_key(&root, b"pw", weak, &rng), Err(KeyError::WeakParameters(_))));
    let sealed = seal_root_key(&root, b"pw", SealParams::MINIMUM, &rng).unwrap();
    // Lower t_cost in the header: refused by the floor before any work.
    let mut lowered = sealed.clone();
    lowered[8 + 7] = 1;
    assert!(matches!(unseal_root_key(&lowered, b"pw"), Err(KeyError::WeakParameters(_))));
    // Raise t_cost: the header is authenticated, so it reads as a wrong passphrase.
    let mut raised = sealed.clone();
    raised[8 + 7] = 3;
    assert_eq!(unseal_root_key(&raised, b"pw").unwrap_err(), KeyError::WrongPassphrase);
    // Garbage and truncation are malformed, not panics.
    assert!(matches!(unseal_root_key(b"hello", b"pw"), Err(KeyError::Malformed(_))));
    assert!(matches!(unseal_root_key(&sealed[..sealed.len() - 1], b"pw"), Err(KeyError::Malformed(_))));
}

#[test]
fn derived_keys_are_separated_by_label() {
    // A vault from before derivation keys derives from its root key's bytes: same vector.
    let root = RootKey::from_key(Key256::from_slice(&[0x44; 32]).unwrap());
    let dk = root.legacy_derivation_key().unwrap();
    let a = dk.derive(labels::TOKEN_PEPPER).unwrap();
    let b = dk.derive(labels::SUBJECT_INDEX).unwrap();
    assert_ne!(a.mac(b"x"), b.mac(b"x"));
    assert!(a.verify(b"x", &a.mac(b"x")));
    assert!(!a.verify(b"x", &b.mac(b"x")));
    // Pinned: HKDF-SHA256(salt, root=0x44*32, info=token-pepper) then HMAC("x").
    assert_eq!(hex::encode(a.mac(b"x")), include_str!("../testdata/token_pepper_mac.hex").trim_ascii());
}

#[test]
fn seal_fields_uses_distinct_nonces_and_binds_each_field() {
    let rng = OsRandom::new();
    let (a, b) = (Plaintext::from_str_copy("a@example.go.th"), Plaintext::from_str_copy("สมชาย"));
    let envs = seal_fields(&dek(1), b"rec-9", &[("email", &a), ("name", &b)], &rng).unwrap();
    assert_eq!(envs.len(), 2);
    assert_ne!(envs[0][5..17], envs[1][5..17], "each field its own nonce");
    let ctx = |field| FieldContext { record_id: b"rec-9", field };
    assert_eq!(open_field(&dek(1), ctx("email"), &envs[0]).unwrap(), a);
    assert_eq!(open_field(&dek(1), ctx("name"), &envs[1]).unwrap(), b);
    assert!(open_field(&dek(1), ctx("name"), &envs[0]).is_err());
}

fn root44() -> RootKey {
    RootKey::from_key(Key256::from_slice(&[0x44; 32]).unwrap())
}

#[test]
fn any_threshold_of_the_shares_rebuild_the_root_key_and_fewer_do_not() {
    let rng = OsRandom::new();
    let shares = split_root_key(&root44(), 3, 5, &rng).unwrap();
    assert_eq!(shares.iter().map(KeyShare::index).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    let kek = Kek::generate(1, &rng).unwrap();
    let wrapped = root44().wrap_kek(&kek, &rng).unwrap();
    for combo in [[0, 1, 2], [0, 2, 4], [4, 3, 1], [1, 2, 3]] {
        let picked: Vec<&KeyShare> = combo.iter().map(|&i| &shares[i]).collect();
        let root = combine_root_key(&picked).unwrap();
        assert_eq!(root.unwrap_kek(&wrapped).unwrap().version(), 1, "{combo:?}");
    }
    // K-1 shares, or K with a duplicate, are refused before any arithmetic.
    let two = [&shares[0], &shares[3]];
    assert_eq!(combine_root_key(&two).unwrap_err(), KeyError::NotEnoughShares { have: 2, need: 3 });
    let dup = [&shares[0], &shares[3], &shares[3]];
    assert_eq!(combine_root_key(&dup).unwrap_err(), KeyError::NotEnoughShares { have: 2, need: 3 });
    // Shares of two different splits rebuild garbage, which the caller's check catches.
    let other = split_root_key(&root44(), 3, 5, &rng).unwrap();
    let mixed = combine_root_key(&[&shares[0], &shares[1], &other[2]]).unwrap();
    assert!(mixed.unwrap_kek(&wrapped).is_err());
    // Impossible schemes.
    for (k, n) in [(1, 3), (4, 3), (2, 17), (0, 0)] {
        assert!(matches!(split_root_key(&root44(), k, n, &rng), Err(KeyError::InvalidScheme { .. })));
    }
}

#[test]
fn sealed_share_known_answer_and_tamper() {
    // A pinned share sealed with a pinned salt and nonce: the stored format cannot drift.
    let pinned = KeyShare::pinned(2, 2, [0x77; 32]);
    let sealed = crate::custody::seal_share_with(
        &pinned,
        b"custodian two",
        SealParams::MINIMUM,
        &[0x55; 16],
        &[0x66; 12],
    )
    .unwrap();
    assert_eq!(hex::encode(&sealed), include_str!("../testdata/custodian_share_v1.hex").trim_ascii());
    assert_eq!(sealed_share_info(&sealed).unwrap(), (2, 2));
    let opened = unseal_share(&sealed, b"custodian two").unwrap();
    assert_eq!((opened.index(), opened.threshold()), (2, 2));
    assert_eq!(opened.bytes(), pinned.bytes());
    assert_eq!(unseal_share(&sealed, b"custodian one").unwrap_err(), KeyError::WrongPassphrase);
    // Relabel the share as custodian 3, or lower its threshold: the header is authenticated.
    let index_at = 7 + 1 + 12 + 1;
    for (at, value) in [(index_at, 3u8), (index_at - 1, 1u8)] {
        let mut forged = sealed.clone();
        forged[at] = value;
        assert_eq!(
            unseal_share(&forged, b"custodian two").unwrap_err(),
            KeyError::WrongPassphrase,
            "byte {at}"
        );
    }
    // Every ciphertext bit matters.
    for bit in [8 * (sealed.len() - 1), 8 * (sealed.len() - 30)] {
        let mut flipped = sealed.clone();
        flipped[bit / 8] ^= 1;
        assert_eq!(unseal_share(&flipped, b"custodian two").unwrap_err(), KeyError::WrongPassphrase);
    }
    assert!(matches!(unseal_share(&sealed[..sealed.len() - 1], b"x"), Err(KeyError::Malformed(_))));
    assert!(matches!(unseal_share(b"KHLROOT", b"x"), Err(KeyError::Malformed(_))));
    // A passphrase change keeps the share and its header, and the old passphrase stops working.
    let changed = reseal(&sealed, b"custodian two", b"new words", &OsRandom::new()).unwrap();
    assert_eq!(changed[..7 + 1 + 12 + 2], sealed[..7 + 1 + 12 + 2]);
    assert_eq!(unseal_share(&changed, b"new words").unwrap().bytes(), pinned.bytes());
    assert_eq!(unseal_share(&changed, b"custodian two").unwrap_err(), KeyError::WrongPassphrase);
    assert_eq!(reseal(&sealed, b"wrong", b"x", &OsRandom::new()).unwrap_err(), KeyError::WrongPassphrase);
    let printed = format!("{opened:?}");
    assert_eq!(printed, "KeyShare { index: 2, .. }");
}

#[test]
fn derivation_key_survives_a_rekey_and_its_wrap_is_bound() {
    let rng = OsRandom::new();
    let dk = DerivationKey::generate(&rng).unwrap();
    let pepper = dk.derive(labels::TOKEN_PEPPER).unwrap().mac(b"t");
    let old_root = root44();
    let new_root = RootKey::generate(&rng).unwrap();
    let rewrapped = new_root
        .wrap_derivation_key(
            &old_root.unwrap_derivation_key(&old_root.wrap_derivation_key(&dk, &rng).unwrap()).unwrap(),
            &rng,
        )
        .unwrap();
    let back = new_root.unwrap_derivation_key(&rewrapped).unwrap();
    assert_eq!(back.derive(labels::TOKEN_PEPPER).unwrap().mac(b"t"), pepper);
    assert_eq!(back.audit_signer().unwrap().public_key(), dk.audit_signer().unwrap().public_key());
    assert!(old_root.unwrap_derivation_key(&rewrapped).is_err());
    // A KEK wrap is not a derivation-key wrap, even under the same root key.
    let kek_wrap = new_root.wrap_kek(&Kek::generate(1, &rng).unwrap(), &rng).unwrap();
    assert!(new_root.unwrap_derivation_key(&kek_wrap).is_err());
    assert_eq!(format!("{back:?}"), "DerivationKey { .. }");
}

mod audit_chain_tests {
    use crate::audit_chain::*;
    use crate::*;

    fn legacy_key() -> DerivationKey {
        RootKey::from_key(Key256::from_slice(&[0x44; 32]).unwrap()).legacy_derivation_key().unwrap()
    }

    #[test]
    fn authority_tag_known_answer_and_tamper() {
        let tagger = legacy_key().authority_tagger().unwrap();
        let tag = tagger.tag("identity", b"alice", 42, b"body");
        // HKDF-SHA256 under AUTHORITY_TAG, then HMAC-SHA256 over the label, the length-prefixed
        // space and key, the write (u64 BE) and the length-prefixed body, recomputed with ring.
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, labels::HKDF_SALT).extract(&[0x44; 32]);
        let mut key = [0u8; 32];
        prk.expand(&[labels::AUTHORITY_TAG], ring::hkdf::HKDF_SHA256).unwrap().fill(&mut key).unwrap();
        let msg = [
            labels::AUTHORITY_TAG_MESSAGE,
            &8u64.to_be_bytes(),
            b"identity",
            &5u64.to_be_bytes(),
            b"alice",
            &42u64.to_be_bytes(),
            &4u64.to_be_bytes(),
            b"body",
        ]
        .concat();
        let expected = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key), &msg);
        assert_eq!(tag.as_slice(), expected.as_ref());
        assert_eq!(hex::encode(tag), include_str!("../testdata/authority_tag.hex").trim_ascii());
        assert!(tagger.verify("identity", b"alice", 42, b"body", &tag));
        assert!(!tagger.verify("token", b"alice", 42, b"body", &tag), "bound to the key space");
        assert!(!tagger.verify("identity", b"alicf", 42, b"body", &tag), "bound to the key");
        assert!(!tagger.verify("identity", b"alice", 43, b"body", &tag), "bound to the write");
        assert!(!tagger.verify("identity", b"alice", 42, b"bodz", &tag), "bound to the value");
        // The fields are length-prefixed: moving a byte from the key to the space changes the tag.
        assert!(!tagger.verify("identitya", b"lice", 42, b"body", &tag));
        for bit in 0..256 {
            let mut flipped = tag;
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(!tagger.verify("identity", b"alice", 42, b"body", &flipped));
        }
        // Another purpose's key (the audit head tag) never makes a valid authority tag.
        let head = legacy_key().derive(labels::AUDIT_HEAD_TAG).unwrap();
        assert!(!tagger.verify("identity", b"alice", 42, b"body", &head.mac(&msg)));
    }

    #[test]
    fn backup_signature_known_answer_and_tamper() {
        let signer = legacy_key().audit_signer().unwrap();
        let digest = [0x5a; 32];
        let signature = signer.sign_backup(&digest).unwrap();
        // Ed25519 is deterministic: the same key and file give the same signature.
        assert_eq!(hex::encode(&signature), include_str!("../testdata/backup_signature.hex").trim_ascii());
        assert!(verify_backup(signer.public_key(), &digest, &signature));
        let mut other = digest;
        other[0] ^= 1;
        assert!(!verify_backup(signer.public_key(), &other, &signature), "bound to the file");
        let mut flipped = signature.clone();
        flipped[10] ^= 0x04;
        assert!(!verify_backup(signer.public_key(), &digest, &flipped));
        // Another vault's key does not verify it.
        let other_key = DerivationKey::generate(&OsRandom::new()).unwrap().audit_signer().unwrap();
        assert!(!verify_backup(other_key.public_key(), &digest, &signature));
        // A checkpoint signature over the same bytes is not a backup signature (labels differ).
        let cp = signer.sign_checkpoint(1, &digest, 0, 0).unwrap();
        assert!(!verify_backup(signer.public_key(), &digest, &cp.signature));
    }

    #[test]
    fn head_tag_known_answer_and_tamper() {
        let tagger = legacy_key().audit_tagger().unwrap();
        let hash = [0xab; 32];
        let tag = tagger.tag(7, &hash);
        // The construction is standard: HKDF-SHA256(salt, derivation key, info) then HMAC-SHA256
        // over seq (u64 BE) ‖ hash, recomputed here with ring directly.
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, labels::HKDF_SALT).extract(&[0x44; 32]);
        let mut key = [0u8; 32];
        prk.expand(&[labels::AUDIT_HEAD_TAG], ring::hkdf::HKDF_SHA256).unwrap().fill(&mut key).unwrap();
        let msg = [7u64.to_be_bytes().as_slice(), &hash].concat();
        let expected = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key), &msg);
        assert_eq!(tag.as_slice(), expected.as_ref());
        assert_eq!(hex::encode(tag), include_str!("../testdata/audit_head_tag.hex").trim_ascii());
        assert!(tagger.verify(7, &hash, &tag));
        assert!(!tagger.verify(8, &hash, &tag), "bound to the seq");
        let mut other = hash;
        other[31] ^= 1;
        assert!(!tagger.verify(7, &other, &tag), "bound to the hash");
        let mut flipped = tag;
        flipped[0] ^= 0x80;
        assert!(!tagger.verify(7, &hash, &flipped));
        // A key for another purpose never makes a valid tag.
        let pepper = legacy_key().derive(labels::TOKEN_PEPPER).unwrap();
        assert!(!tagger.verify(7, &hash, &pepper.mac(&msg)));
    }

    #[test]
    fn chained_checkpoint_known_answer_and_tamper() {
        let signer = legacy_key().audit_signer().unwrap();
        let cp = signer.sign_checkpoint(5, &[1; 32], 9, 3).unwrap();
        // Ed25519 is deterministic: the same key and message give these bytes.
        assert_eq!(
            hex::encode(&cp.signature),
            include_str!("../testdata/audit_checkpoint_v2.hex").trim_ascii()
        );
        let pk = signer.public_key();
        assert!(verify_checkpoint(pk, &cp));
        for tampered in [
            Checkpoint { prev: Some(4), ..cp.clone() },
            Checkpoint { prev: None, ..cp.clone() },
            Checkpoint { seq: 6, ..cp.clone() },
            Checkpoint { time_ms: 10, ..cp.clone() },
            Checkpoint { hash: [2; 32], ..cp.clone() },
        ] {
            assert!(!verify_checkpoint(pk, &tampered), "{tampered:?}");
        }
    }

    /// `(seq, canonical bytes, stored hash)`.
    type Entries = Vec<(u64, Vec<u8>, [u8; 32])>;

    /// A chain of `n` entries with canonical bytes `{"n":i,"seq":i}`, checkpoints signed at `at`.
    fn chain(n: u64, at: &[u64]) -> (Entries, Vec<Checkpoint>, AuditSigner) {
        let signer = legacy_key().audit_signer().unwrap();
        let (mut prev, mut out, mut cps, mut last_cp) = (GENESIS, Vec::new(), Vec::new(), 0);
        for seq in 1..=n {
            let json = format!(r#"{{"n":{seq},"seq":{seq}}}"#).into_bytes();
            prev = chain_hash(&prev, &json);
            out.push((seq, json, prev));
            if at.contains(&seq) {
                cps.push(signer.sign_checkpoint(seq, &prev, 1, last_cp).unwrap());
                last_cp = seq;
            }
        }
        (out, cps, signer)
    }

    fn run(v: &mut ChainVerifier<'_>, entries: &[(u64, Vec<u8>, [u8; 32])]) {
        for (seq, json, hash) in entries {
            v.entry(*seq, Some(*seq), json, hash);
        }
    }

    #[test]
    fn deleting_a_middle_checkpoint_is_caught() {
        let (entries, cps, signer) = chain(10, &[3, 6, 9]);
        let mut v = ChainVerifier::new(signer.public_key(), cps.clone());
        run(&mut v, &entries);
        let report = v.finish();
        assert_eq!(
            (report.verdict(), report.last_checkpoint),
            (Verdict::Unverified("entries 10 to 10 are not covered by a signed checkpoint".into()), 9)
        );
        let without_6: Vec<Checkpoint> = cps.into_iter().filter(|c| c.seq != 6).collect();
        let mut v = ChainVerifier::new(signer.public_key(), without_6);
        run(&mut v, &entries);
        let b = v.finish().first_break.unwrap();
        assert_eq!(b.seq, 6, "{b:?}");
        assert!(b.reason.contains("missing"), "{b:?}");
    }

    #[test]
    fn a_rechain_is_named_after_the_last_proof_and_tags_narrow_it() {
        let (mut entries, cps, signer) = chain(10, &[3, 10]);
        let tagger = legacy_key().audit_tagger().unwrap();
        let tag5 = tagger.tag(5, &entries[4].2);
        // Entry 7 edited and everything after it rechained.
        let mut prev = entries[5].2;
        for e in entries.iter_mut().skip(6) {
            if e.0 == 7 {
                e.1 = br#"{"n":70,"seq":7}"#.to_vec();
            }
            prev = chain_hash(&prev, &e.1);
            e.2 = prev;
        }
        let feed = |with_tag: bool| {
            let mut v = ChainVerifier::new(signer.public_key(), cps.clone()).with_tagger(&tagger);
            for (seq, json, hash) in &entries {
                v.entry(*seq, Some(*seq), json, hash);
                if with_tag && *seq == 5 {
                    v.tag(5, &tag5);
                }
            }
            v.finish().first_break.unwrap().seq
        };
        assert_eq!(feed(false), 4, "only the checkpoint at 3 proves anything before the edit");
        assert_eq!(feed(true), 6, "the tag at 5 proves up to 5");
        // A forged tag does not verify.
        let mut v = ChainVerifier::new(signer.public_key(), vec![]).with_tagger(&tagger);
        run(&mut v, &entries[..5]);
        v.tag(5, &[0; 32]);
        assert_eq!(v.finish().first_break.unwrap().seq, 1);
    }

    #[test]
    fn a_carried_forward_break_resumes_only_from_a_signed_anchor() {
        let (mut entries, cps, signer) = chain(6, &[3, 6]);
        // Entry 5 is damaged; the vault carries it forward at 7, linking from its signed head 6.
        entries[4].1 = b"garbage".to_vec();
        let anchor = cps[1].clone();
        let declaration = format!(
            r#"{{"anchor":{{"hash":"{}","prev":3,"seq":6,"signature":"{}","time_ms":1}},"damaged_from":4,"damaged_to":6,"reason":"x","rpc":"AuditBreak","seq":7}}"#,
            hex::encode(anchor.hash),
            hex::encode(&anchor.signature)
        );
        let linked = chain_hash(&anchor.hash, declaration.as_bytes());
        let after = br#"{"n":8,"seq":8}"#.to_vec();
        let after_hash = chain_hash(&linked, &after);
        let cp8 = signer.sign_checkpoint(8, &after_hash, 1, 6).unwrap();
        entries.push((7, declaration.clone().into_bytes(), linked));
        entries.push((8, after.clone(), after_hash));
        let mut all = cps.clone();
        all.push(cp8);
        let mut v = ChainVerifier::new(signer.public_key(), all.clone());
        run(&mut v, &entries);
        let report = v.finish();
        assert_eq!(
            report.first_break.as_ref().map(|b| b.seq),
            Some(4),
            "the declared damage is the first break"
        );
        assert_eq!(
            (report.resumed_at.clone(), report.last_checkpoint, report.uncarried.clone()),
            (vec![7], 8, None)
        );
        // A forger's AuditBreak naming an anchor with a bad signature does not resume anything.
        let forged = declaration.replace(&hex::encode(&anchor.signature)[..8], "00000000");
        let mut entries2 = entries.clone();
        entries2[6] = (7, forged.clone().into_bytes(), chain_hash(&anchor.hash, forged.as_bytes()));
        let mut v = ChainVerifier::new(signer.public_key(), all);
        run(&mut v, &entries2);
        let report = v.finish();
        assert!(report.resumed_at.is_empty() && report.uncarried.is_some(), "{report:?}");
    }
}
