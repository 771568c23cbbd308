//! The adapter against a real software token (opencryptoki, started by scripts/with-softtoken,
//! which the README's test command runs).

use std::path::PathBuf;

use tokenvault_pkcs11::{Pin, Token, TokenConfig, TokenError, TokenSelector};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with ./scripts/test, which starts a software PKCS#11 token (scripts/with-softtoken)")
    })
}

fn config() -> TokenConfig {
    TokenConfig {
        module: PathBuf::from(env("TOKENVAULT_TEST_PKCS11_MODULE")),
        token: TokenSelector::Label(env("TOKENVAULT_TEST_PKCS11_LABEL")),
        pin: Pin::new(env("TOKENVAULT_TEST_PKCS11_PIN")),
        // opencryptoki 3.8's soft token crashes when two sessions use one key at once.
        max_sessions: 1,
    }
}

fn random_id() -> Vec<u8> {
    use rand::RngCore as _;
    let mut id = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut id);
    id
}

fn encrypt(modulus: &[u8], exponent: &[u8], label: &str, plain: &[u8]) -> Vec<u8> {
    let key = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(modulus),
        rsa::BigUint::from_bytes_be(exponent),
    )
    .expect("public key");
    key.encrypt(
        &mut rand::rngs::OsRng,
        rsa::Oaep::new_with_label::<sha2::Sha256, _>(label),
        plain,
    )
    .expect("encrypt")
}

#[test]
fn a_generated_key_decrypts_oaep_sha256_with_a_label_and_never_shows_its_private_half() {
    let token = Token::open(config()).expect("open");
    let pair = token.generate_rsa_2048().expect("generate");
    assert_eq!(pair.modulus.len(), 256, "RSA-2048");
    assert_eq!(pair.public_exponent, vec![1, 0, 1]);
    let id = random_id();
    token.name(&pair, &id, "tokenvault test key").expect("name");
    let found = token.find(&id).expect("find").expect("present");
    assert_eq!(found.modulus, pair.modulus);

    let ct = encrypt(
        &pair.modulus,
        &pair.public_exponent,
        "tokenvault/test",
        &[9u8; 32],
    );
    let plain = token
        .decrypt_oaep_sha256(found.handle, &ct, b"tokenvault/test")
        .expect("decrypt");
    assert_eq!(plain.as_slice(), &[9u8; 32]);
    // Another label, an altered byte, a short input: the one answer.
    for (ct, label) in [
        (ct.clone(), &b"tokenvault/other"[..]),
        (
            {
                let mut c = ct.clone();
                c[100] ^= 1;
                c
            },
            &b"tokenvault/test"[..],
        ),
        (ct[..10].to_vec(), &b"tokenvault/test"[..]),
    ] {
        assert!(matches!(
            token.decrypt_oaep_sha256(found.handle, &ct, label),
            Err(TokenError::DecryptionFailed)
        ));
    }
    assert!(
        !token.exposes_private_value(&id).expect("check"),
        "CKA_VALUE, the private exponent and the primes are refused"
    );

    // Several threads at once, each on a session of its own.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..300 {
                    let plain = token
                        .decrypt_oaep_sha256(found.handle, &ct, b"tokenvault/test")
                        .expect("decrypt");
                    assert_eq!(plain.as_slice(), &[9u8; 32]);
                }
            });
        }
    });

    token.destroy(&id).expect("destroy");
    assert!(token.find(&id).expect("find").is_none(), "both halves gone");
    token.destroy(&id).expect("destroying again is fine");
}

#[test]
fn a_wrong_pin_a_missing_module_and_an_unknown_token_are_start_errors_naming_what_to_fix() {
    let mut wrong = config();
    wrong.pin = Pin::new("99990000".into());
    let e = Token::open(wrong).expect_err("wrong PIN");
    assert!(matches!(e, TokenError::Login(_)), "{e}");
    assert!(!e.to_string().contains("9999"), "no PIN in {e}");

    let mut missing = config();
    missing.module = PathBuf::from("/nonexistent/libpkcs11.so");
    let e = Token::open(missing).expect_err("missing module");
    assert_eq!(
        e.to_string(),
        "PKCS#11 module /nonexistent/libpkcs11.so: no such file"
    );

    let mut unknown = config();
    unknown.token = TokenSelector::Label("no-such-token".into());
    let e = Token::open(unknown).expect_err("unknown token");
    let text = e.to_string();
    assert!(
        text.starts_with("no initialized PKCS#11 token with token label \"no-such-token\""),
        "{text}"
    );
    assert!(
        text.contains(&env("TOKENVAULT_TEST_PKCS11_LABEL")),
        "lists the tokens: {text}"
    );

    assert_eq!(format!("{:?}", config().pin), "Pin(redacted)");
}

#[test]
fn a_key_is_registered_by_label_only_if_it_can_never_leave_the_token() {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::Attribute;
    let token = Token::open(config()).expect("open");
    let kept = format!("kept-{}", hex(&random_id()[..4]));
    let pair = token.generate_rsa_2048().expect("generate");
    token.name(&pair, &random_id(), &kept).expect("label");
    let found = token
        .find_labelled(&kept)
        .expect("a sensitive, never-extractable key");
    assert!(found.imported);
    assert_eq!(found.modulus, pair.modulus);
    let id = random_id();
    token.name(&found, &id, "ignored").expect("give it an id");
    assert!(token.find(&id).expect("find").is_some());
    assert!(
        token.find_labelled(&kept).is_ok(),
        "an imported key keeps its label"
    );
    token.destroy(&id).expect("clean up");

    // A key that was created extractable is refused, whatever it is now.
    let loose = format!("loose-{}", hex(&random_id()[..4]));
    let ctx = cryptoki::context::Pkcs11::new(config().module).expect("module");
    let _ = ctx.initialize(cryptoki::context::CInitializeArgs::new(
        cryptoki::context::CInitializeFlags::OS_LOCKING_OK,
    ));
    let slot = ctx.get_slots_with_token().expect("slots")[0];
    let session = ctx.open_rw_session(slot).expect("session");
    let _ = session.login(
        cryptoki::session::UserType::User,
        Some(&cryptoki::types::AuthPin::new(
            env("TOKENVAULT_TEST_PKCS11_PIN").into(),
        )),
    );
    let label = Attribute::Label(loose.as_bytes().to_vec());
    session
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
                label.clone(),
            ],
            &[
                Attribute::Token(true),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Decrypt(true),
                label,
            ],
        )
        .expect("an extractable key");
    let e = token.find_labelled(&loose).expect_err("extractable");
    assert!(
        e.to_string()
            .contains("must be sensitive, never extractable and able to decrypt"),
        "{e}"
    );
    assert!(matches!(
        token.find_labelled("no-such-label"),
        Err(TokenError::NotFound(_))
    ));
    for object in session
        .find_objects(&[Attribute::Label(loose.as_bytes().to_vec())])
        .expect("find")
    {
        session.destroy_object(object).expect("clean up");
    }
    drop(session);
    // Never finalized: a dropped context would C_Finalize the module under the other tests.
    std::mem::forget(ctx);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
