//! Envelope v2 (HPKE with X-Wing): the X-Wing draft's and RFC 9180's known answers, the v2
//! format end to end, rewrap between v1 and v2, and every tampering and mismatch.

use std::path::{Path, PathBuf};

use hpke::{Deserializable as _, Kem as _, Serializable as _};

use crate::envelope::{self, DecryptError, EnvelopeRef, FormatError, format};
use crate::keys::xwing::{self, KEM_ID_XWING, XWingKem};
use crate::keys::{Algorithm, PrivateKey, PublicKey, Scheme, Unwrapper, UnwrapperLookup, Wrapper};
use crate::record::{RecordMeta, SecretKind};
use crate::secret::{Passphrase, Secret};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PrivateKey {
    let pem = std::fs::read_to_string(root().join(format!("keys/test/{name}.key.pem")))
        .expect("fixture key present");
    PrivateKey::from_pem(&pem, None).expect("fixture key parses")
}

fn meta(id: &str) -> RecordMeta {
    RecordMeta::parse(id, "user-42", "github", SecretKind::AccessToken, &[], 0).expect("meta")
}

/// An RNG that hands out fixed bytes, as a KEM vector's encapsulation randomness.
struct Fixed(Vec<u8>);

impl hpke::rand_core::TryRng for Fixed {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        unreachable!("KEMs draw bytes")
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        unreachable!("KEMs draw bytes")
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        assert!(
            dst.len() <= self.0.len(),
            "the vector has too few random bytes"
        );
        let rest = self.0.split_off(dst.len());
        dst.copy_from_slice(&self.0);
        self.0 = rest;
        Ok(())
    }
}

impl hpke::rand_core::TryCryptoRng for Fixed {}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("hex")
}

#[test]
fn x_wing_matches_the_drafts_test_vectors() {
    let text = std::fs::read_to_string(root().join("tests/vectors/xwing-draft.json"))
        .expect("the draft's vectors");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
    let vectors = doc["vectors"].as_array().expect("vectors");
    assert_eq!(vectors.len(), 3);
    for v in vectors {
        let field = |k: &str| unhex(v[k].as_str().expect("hex field"));
        let sk = <XWingKem as hpke::Kem>::PrivateKey::from_bytes(&field("seed")).expect("seed");
        let pk = XWingKem::sk_to_pk(&sk);
        assert_eq!(
            pk.to_bytes().to_vec(),
            field("pk"),
            "public key from the seed"
        );
        let (ss, ct) =
            XWingKem::encap_with_rng(&pk, None, &mut Fixed(field("eseed"))).expect("encapsulate");
        assert_eq!(ct.to_bytes().to_vec(), field("ct"), "ciphertext");
        assert_eq!(ss.0.to_vec(), field("ss"), "shared secret (encapsulation)");
        let ct = <XWingKem as hpke::Kem>::EncappedKey::from_bytes(&field("ct")).expect("ct");
        let ss = XWingKem::decap(&sk, None, &ct).expect("decapsulate");
        assert_eq!(ss.0.to_vec(), field("ss"), "shared secret (decapsulation)");
        // The daemon's own decapsulation (expanded keys kept, aws-lc-rs) agrees.
        let seed: [u8; 32] = field("seed").try_into().expect("32 bytes");
        let ss = crate::keys::xwing_decapsulate_for_tests(&seed, &field("ct")).expect("decap");
        assert_eq!(
            ss.to_vec(),
            field("ss"),
            "shared secret (the daemon's decapsulation)"
        );
    }
    // The fixture keys are the draft's first two: PKCS#8 and SPKI as this crate reads them.
    let a = fixture("fixture-xwing");
    assert_eq!(
        a.public_key().raw(),
        unhex(vectors[0]["pk"].as_str().expect("pk"))
    );
    assert_eq!(a.public_key().algorithm(), Algorithm::XWing);
    let b = fixture("fixture-xwing-b");
    assert_eq!(
        b.public_key().raw(),
        unhex(vectors[1]["pk"].as_str().expect("pk"))
    );
    let spki =
        std::fs::read_to_string(root().join("keys/test/fixture-xwing.pub.pem")).expect("pem");
    assert_eq!(PublicKey::from_pem(&spki).expect("spki").id(), a.key_id());
    let prefix = unhex("308204d4300d060b2b0601040183e62d81c87a038204c100");
    assert_eq!(prefix.len(), 24);
    assert_eq!(
        a.public_key().spki_der(),
        [prefix, a.public_key().raw().to_vec()].concat(),
        "SPKI: id-XWing, no parameters, the raw key as the BIT STRING"
    );
}

/// RFC 9180 A.1.1 (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base mode): the key
/// schedule and AEAD sequence that v2 uses with X-Wing and AES-256-GCM, checked through the
/// same HPKE implementation.
#[test]
fn hpke_key_schedule_and_aead_match_rfc_9180_appendix_a_1_1() {
    type Kem = hpke::kem::X25519HkdfSha256;
    type Aead = hpke::aead::AesGcm128;
    let info = unhex("4f6465206f6e2061204772656369616e2055726e");
    let ikm_e = unhex("7268600d403fce431561aef583ee1613527cff655c1343f29812e66706df3234");
    let pk_rm = unhex("3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d");
    let sk_rm = unhex("4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8");
    let enc = unhex("37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431");
    let pt = unhex("4265617574792069732074727574682c20747275746820626561757479");
    let cts = [
        "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a",
        "af2d7e9ac9ae7e270f46ba1f975be53c09f8d875bdc8535458c2494e8a6eab251c03d0c22a56b8ca42c2063b84",
        "498dfcabd92e8acedc281e85af1cb4e3e31c7dc394a1ca20e173cb72516491588d96a19ad4a683518973dcc180",
    ];
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&pk_rm).expect("pkR");
    let (got_enc, mut sender) = hpke::setup_sender_with_rng::<Aead, hpke::kdf::HkdfSha256, Kem>(
        &hpke::OpModeS::Base,
        &pk,
        &info,
        &mut Fixed(ikm_e),
    )
    .expect("setup sender");
    assert_eq!(got_enc.to_bytes().to_vec(), enc);
    let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(&sk_rm).expect("skR");
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&enc).expect("enc");
    let mut receiver = hpke::setup_receiver::<Aead, hpke::kdf::HkdfSha256, Kem>(
        &hpke::OpModeR::Base,
        &sk,
        &enc,
        &info,
    )
    .expect("setup receiver");
    // The daemon's own key schedule (used with X-Wing's suite id) on this vector's suite.
    let (key, base_nonce) = crate::keys::hpke_key_schedule_for_tests(
        *b"HPKE\x00\x20\x00\x01\x00\x01",
        16,
        &unhex("fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc"),
        &info,
    );
    assert_eq!(hex::encode(key), "4531685d41d65f03dc48f6b8302c05b0");
    assert_eq!(hex::encode(base_nonce), "56d890e5accaaf011cff4b7d");
    for (seq, ct) in cts.iter().enumerate() {
        let aad = format!("Count-{seq}");
        assert_eq!(
            hex::encode(sender.seal(&pt, aad.as_bytes()).expect("seal")),
            *ct,
            "sequence {seq}"
        );
        assert_eq!(receiver.open(&unhex(ct), aad.as_bytes()).expect("open"), pt);
    }
}

#[test]
fn a_v2_envelope_opens_and_has_the_documented_size() {
    let key = fixture("fixture-xwing");
    let m = meta("github:user-42");
    let secret = Secret::new(b"gho_post-quantum".to_vec());
    let env = envelope::seal(&m, &secret, key.public_key()).expect("seal");
    assert_eq!(&env[..6], b"TVE\x02\x64\x7a");
    assert_eq!(&env[6..38], &key.key_id().0);
    assert_eq!(env.len(), 40 + 1120 + 48 + 12 + secret.len() + 16);
    let opened = envelope::open(&m, &env, &key).expect("open");
    assert_eq!(opened.expose_secret(), secret.expose_secret());
    // The pure-Rust sealing path is the same for X-Wing.
    let env = envelope::seal(&m, &secret, &key.public_key().rust_crypto()).expect("seal");
    assert_eq!(
        envelope::open(&m, &env, &key)
            .expect("open")
            .expose_secret(),
        b"gho_post-quantum"
    );
}

struct Both<'a>(&'a PrivateKey, &'a PrivateKey);

impl UnwrapperLookup for Both<'_> {
    fn unwrapper(
        &self,
        id: &crate::keys::KeyId,
    ) -> Result<&dyn Unwrapper, crate::keys::KeyLookupError> {
        [self.0, self.1]
            .into_iter()
            .find(|k| k.key_id() == *id)
            .map(|k| k as &dyn Unwrapper)
            .ok_or(crate::keys::KeyLookupError::UnknownKey(*id))
    }
}

#[test]
fn rewrap_moves_a_record_between_v1_and_v2_keeping_its_ciphertext_byte_for_byte() {
    let rsa = fixture("fixture-a");
    let pq = fixture("fixture-xwing");
    let keys = Both(&rsa, &pq);
    let m = meta("github:user-42");
    let v1 =
        envelope::seal(&m, &Secret::new(b"refresh-me".to_vec()), rsa.public_key()).expect("seal");
    let v2 = envelope::rewrap(&m, &v1, &keys, pq.public_key()).expect("rewrap to v2");
    let (a, b) = (
        EnvelopeRef::decode(&v1).expect("v1"),
        EnvelopeRef::decode(&v2).expect("v2"),
    );
    assert_eq!(b.scheme, Scheme::Hpke(KEM_ID_XWING));
    assert_eq!(b.key_id, pq.key_id());
    assert_eq!((a.nonce, a.ciphertext), (b.nonce, b.ciphertext));
    assert_eq!(&v2[v2.len() - a.ciphertext.len()..], a.ciphertext);
    assert_eq!(
        envelope::open(&m, &v2, &keys)
            .expect("open")
            .expose_secret(),
        b"refresh-me"
    );
    let back = envelope::rewrap(&m, &v2, &keys, rsa.public_key()).expect("rewrap to v1");
    let c = EnvelopeRef::decode(&back).expect("v1 again");
    assert_eq!(c.scheme, Scheme::RsaOaep);
    assert_eq!((c.nonce, c.ciphertext), (a.nonce, a.ciphertext));
    // A record bound to another identity is not rewrapped.
    assert!(envelope::rewrap(&meta("github:user-43"), &v1, &keys, pq.public_key()).is_err());
}

#[test]
fn every_tampering_of_a_v2_envelope_is_refused() {
    let rsa = fixture("fixture-a");
    let pq = fixture("fixture-xwing");
    let other = fixture("fixture-xwing-b");
    let m = meta("github:user-42");
    let env = envelope::seal(&m, &Secret::new(b"t0ken".to_vec()), pq.public_key()).expect("seal");
    let flip = |at: usize| {
        let mut e = env.clone();
        e[at] ^= 0x01;
        e
    };
    let enc_at = format::HEADER_LEN_V2;
    let sealed_at = enc_at + xwing::XWING_ENC_LEN;
    let nonce_at = sealed_at + xwing::SEALED_DEK_LEN;
    for (what, bytes) in [
        ("enc (ML-KEM part)", flip(enc_at + 5)),
        ("enc (X25519 part)", flip(sealed_at - 3)),
        ("sealed data key", flip(sealed_at + 2)),
        ("nonce", flip(nonce_at)),
        ("ciphertext", flip(nonce_at + 12)),
        ("tag", flip(env.len() - 1)),
    ] {
        assert_eq!(
            envelope::open(&m, &bytes, &pq).map(|_| ()),
            Err(DecryptError::DecryptionFailed),
            "{what}"
        );
    }
    // Another record identity (the AAD).
    assert_eq!(
        envelope::open(&meta("github:user-43"), &env, &pq).map(|_| ()),
        Err(DecryptError::DecryptionFailed)
    );
    // The fingerprint of another X-Wing key: HPKE's info binds the fingerprint, and the key
    // differs, so it fails to open rather than opening under the wrong name.
    let keys = Both(&pq, &other);
    let mut renamed = env.clone();
    renamed[6..38].copy_from_slice(&other.key_id().0);
    assert_eq!(
        envelope::open(&m, &renamed, &keys).map(|_| ()),
        Err(DecryptError::DecryptionFailed)
    );
    // The same key's bytes under its own name but with the info of another fingerprint cannot
    // be built without the key; an unknown fingerprint is named as such.
    assert!(matches!(
        envelope::open(&m, &renamed, &pq),
        Err(DecryptError::UnknownKey(_))
    ));
    // Another KEM id: refused as a format error before any key is touched.
    let mut kem = env.clone();
    kem[4..6].copy_from_slice(&0x0041u16.to_be_bytes());
    assert_eq!(
        envelope::open(&m, &kem, &pq).map(|_| ()),
        Err(DecryptError::Format(FormatError::UnknownKem(0x0041)))
    );
    // A v2 envelope naming an RSA key, and a v1 envelope naming an X-Wing key.
    let keys = Both(&rsa, &pq);
    let mut v2_rsa = env.clone();
    v2_rsa[6..38].copy_from_slice(&rsa.key_id().0);
    assert_eq!(
        envelope::open(&m, &v2_rsa, &keys).map(|_| ()),
        Err(DecryptError::SchemeMismatch {
            envelope: Scheme::Hpke(KEM_ID_XWING),
            key: Scheme::RsaOaep
        })
    );
    let mut v1 =
        envelope::seal(&m, &Secret::new(b"t0ken".to_vec()), rsa.public_key()).expect("seal v1");
    v1[4..36].copy_from_slice(&pq.key_id().0);
    let err = envelope::open(&m, &v1, &keys).expect_err("mismatch");
    assert_eq!(
        err,
        DecryptError::SchemeMismatch {
            envelope: Scheme::RsaOaep,
            key: Scheme::Hpke(KEM_ID_XWING)
        }
    );
    assert_eq!(
        err.to_string(),
        "the envelope is RSA-OAEP (envelope v1) but its key is HPKE X-Wing (envelope v2)"
    );
}

#[test]
fn malformed_encapsulations_are_refused_without_panicking() {
    use rand::{RngCore as _, SeedableRng as _};
    let pq = fixture("fixture-xwing");
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(26);
    let mut wrapped = vec![0u8; xwing::XWING_ENC_LEN + xwing::SEALED_DEK_LEN];
    for round in 0..64 {
        match round {
            0 => wrapped.fill(0),
            1 => wrapped.fill(0xff),
            _ => rng.fill_bytes(&mut wrapped),
        }
        assert!(pq.unwrap_dek(&wrapped).is_err(), "round {round}");
    }
    for len in [0, 1, 1119, 1120, 1167, 1169, 4096] {
        assert!(pq.unwrap_dek(&vec![7u8; len]).is_err(), "length {len}");
    }
}

#[test]
fn x_wing_private_keys_round_trip_through_pkcs8_files_and_the_shared_store_form() {
    let key = PrivateKey::generate_with(Algorithm::XWing).expect("generate");
    assert_eq!(key.public_key().algorithm(), Algorithm::XWing);
    assert_eq!(key.scheme(), Scheme::Hpke(KEM_ID_XWING));
    let plain = key.to_pkcs8_pem(None).expect("pem");
    assert!(plain.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(
        PrivateKey::from_pem(&plain, None).expect("reads").key_id(),
        key.key_id()
    );
    let pass = Passphrase::new("correct horse".to_string());
    let locked = key.to_pkcs8_pem(Some(&pass)).expect("encrypted pem");
    assert!(locked.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    assert_eq!(
        PrivateKey::from_pem(&locked, Some(&pass))
            .expect("reads")
            .key_id(),
        key.key_id()
    );
    let kek = [9u8; 32];
    let sealed = key.seal_with(&kek).expect("seal");
    assert_eq!(
        PrivateKey::open_sealed(&sealed, &kek)
            .expect("opens")
            .key_id(),
        key.key_id()
    );
    // The Debug form names the key, never its seed.
    let shown = format!("{key:?}");
    assert!(
        shown.contains(&key.key_id().to_hex()) && !shown.contains("seed"),
        "{shown}"
    );
    // A PKCS#8 with id-XWing but not a 32-byte seed is refused, naming why.
    let bad = "-----BEGIN PRIVATE KEY-----\nMDMCAQAwDQYLKwYBBAGD5i2ByHoEHwABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZ\nGhscHR4=\n-----END PRIVATE KEY-----\n";
    let err = PrivateKey::from_pem(bad, None).expect_err("31 bytes");
    assert!(err.to_string().contains("32-byte seed"), "{err}");
    // RSA-3072 is generated on request too.
    let rsa = PrivateKey::generate_with(Algorithm::Rsa(3072)).expect("rsa-3072");
    assert_eq!(rsa.public_key().algorithm(), Algorithm::Rsa(3072));
    assert_eq!(rsa.public_key().wrapped_len(), 384);
    let wrapper: &dyn Wrapper = key.public_key();
    assert_eq!(wrapper.scheme(), Scheme::Hpke(KEM_ID_XWING));
}

/// The v2 vectors' `eseed` is the X-Wing encapsulation randomness their enc was made with, so
/// a sealer that encapsulates deterministically can rebuild them byte for byte.
#[test]
fn the_v2_vectors_enc_is_the_encapsulation_of_their_eseed() {
    for (name, key) in [
        ("v2-ok-access-token", "fixture-xwing"),
        ("v2-ok-token-bundle-unicode-owner", "fixture-xwing-b"),
    ] {
        let text = std::fs::read_to_string(root().join(format!("tests/vectors/{name}.txt")))
            .expect("vector");
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}: ")))
                .map(unhex)
                .expect("field")
        };
        let envelope = field("envelope");
        let public = fixture(key);
        let pk =
            <XWingKem as hpke::Kem>::PublicKey::from_bytes(public.public_key().raw()).expect("pk");
        let (_, ct) =
            XWingKem::encap_with_rng(&pk, None, &mut Fixed(field("eseed"))).expect("encapsulate");
        assert_eq!(
            &envelope[format::HEADER_LEN_V2..format::HEADER_LEN_V2 + xwing::XWING_ENC_LEN],
            ct.to_bytes().as_slice(),
            "{name}"
        );
    }
}

/// What the `hpke` crate seals (the web tier's side), the daemon's own X-Wing open reads, for
/// fresh keys and secrets, and it agrees with `hpke`'s own open.
#[test]
fn the_daemons_x_wing_open_reads_what_hpke_seals() {
    for round in 0..16 {
        let key = PrivateKey::generate_with(Algorithm::XWing).expect("generate");
        let m = meta(&format!("r{round}"));
        let secret = Secret::new(vec![round; 1 + usize::from(round) * 37]);
        let env = envelope::seal(&m, &secret, key.public_key()).expect("seal");
        assert_eq!(
            envelope::open(&m, &env, &key)
                .expect("open")
                .expose_secret(),
            secret.expose_secret()
        );
        let parsed = EnvelopeRef::decode(&env).expect("decode");
        let (enc, sealed) = parsed.wrapped_dek.split_at(xwing::XWING_ENC_LEN);
        let pem = key.to_pkcs8_pem(None).expect("pem");
        let der = pem_der(&pem);
        let seed: [u8; 32] = der[der.len() - 32..].try_into().expect("seed");
        let sk = <XWingKem as hpke::Kem>::PrivateKey::from_bytes(&seed).expect("sk");
        let reference = hpke::single_shot_open::<xwing::Aead, xwing::Kdf, XWingKem>(
            &hpke::OpModeR::Base,
            &sk,
            &<XWingKem as hpke::Kem>::EncappedKey::from_bytes(enc).expect("enc"),
            &xwing::hpke_info(KEM_ID_XWING, &key.key_id()),
            sealed,
            b"",
        )
        .expect("hpke's open");
        assert_eq!(
            reference,
            key.unwrap_dek(parsed.wrapped_dek)
                .expect("the daemon's open")
                .expose_secret()
                .to_vec()
        );
    }
}

fn pem_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("base64")
}

/// A public key file or registry entry with `id-XWing` that is not an X-Wing key is refused,
/// naming why: a key of another length, and an ML-KEM-768 part that fails FIPS 203's check.
#[test]
fn malformed_x_wing_public_keys_are_refused_naming_why() {
    let good = fixture("fixture-xwing").public_key().raw().to_vec();
    let short = xwing::spki_der(&good[..1215]);
    let err = PublicKey::from_spki_der(&short).expect_err("1,215 bytes");
    assert!(
        err.to_string()
            .contains("1215 bytes; an X-Wing encapsulation key is 1216"),
        "{err}"
    );
    let mut bad = good.clone();
    bad[..1184].fill(0xff);
    let err = PublicKey::from_spki_der(&xwing::spki_der(&bad)).expect_err("coefficients >= q");
    assert!(
        err.to_string()
            .contains("its ML-KEM-768 part is not a valid encapsulation key"),
        "{err}"
    );
}
