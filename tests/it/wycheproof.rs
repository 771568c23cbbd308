//! Wycheproof vectors against the primitives the vault uses: RSA-OAEP with SHA-256 and
//! MGF1-SHA-256 on aws-lc-rs (2048 to 4096-bit keys, the sizes tokenvault accepts), and
//! AES-256-GCM with 96-bit nonces and 128-bit tags from the `aes-gcm` crate.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use aws_lc_rs::rsa::{OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, PrivateDecryptingKey};
use wycheproof::TestResult;

#[test]
fn rsa_oaep_sha256_mgf1_sha256() {
    use wycheproof::rsa_oaep::{TestName, TestSet};
    let mut checked = 0;
    for name in [
        TestName::Rsa2048Sha256Mgf1Sha256,
        TestName::Rsa3072Sha256Mgf1Sha256,
        TestName::Rsa4096Sha256Mgf1Sha256,
    ] {
        let set = TestSet::load(name).expect("vectors load");
        for group in set.test_groups {
            let key = PrivateDecryptingKey::from_pkcs8(&group.pkcs8)
                .ok()
                .and_then(|k| OaepPrivateDecryptingKey::new(k).ok())
                .expect("wycheproof key loads");
            for t in group.tests {
                let mut out = vec![0u8; key.min_output_size()];
                let label = (!t.label.is_empty()).then_some(&t.label[..]);
                let got = key
                    .decrypt(&OAEP_SHA256_MGF1SHA256, &t.ct, &mut out, label)
                    .map(|p| p.to_vec());
                match t.result {
                    TestResult::Valid => assert_eq!(
                        got.as_deref().ok(),
                        Some(&t.pt[..]),
                        "tc {} {}",
                        t.tc_id,
                        t.comment
                    ),
                    TestResult::Invalid => {
                        assert!(got.is_err(), "tc {} {} must fail", t.tc_id, t.comment)
                    }
                    TestResult::Acceptable => {}
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "only {checked} vectors ran");
}

#[test]
fn aes_256_gcm() {
    use wycheproof::aead::{TestName, TestSet};
    let set = TestSet::load(TestName::AesGcm).expect("vectors load");
    let mut checked = 0;
    for group in set
        .test_groups
        .into_iter()
        .filter(|g| g.key_size == 256 && g.nonce_size == 96 && g.tag_size == 128)
    {
        for t in group.tests {
            let cipher = Aes256Gcm::new_from_slice(&t.key).expect("32-byte key");
            let nonce = Nonce::from_slice(&t.nonce);
            let mut sealed = t.ct.to_vec();
            sealed.extend_from_slice(&t.tag);
            let opened = cipher.decrypt(
                nonce,
                Payload {
                    msg: &sealed,
                    aad: &t.aad,
                },
            );
            match t.result {
                TestResult::Valid => {
                    assert_eq!(
                        opened.as_deref().ok(),
                        Some(&t.pt[..]),
                        "tc {} {}",
                        t.tc_id,
                        t.comment
                    );
                    let again = cipher
                        .encrypt(
                            nonce,
                            Payload {
                                msg: &t.pt,
                                aad: &t.aad,
                            },
                        )
                        .expect("encrypt");
                    assert_eq!(again, sealed, "tc {}", t.tc_id);
                }
                TestResult::Invalid => {
                    assert!(opened.is_err(), "tc {} {} must fail", t.tc_id, t.comment)
                }
                TestResult::Acceptable => {}
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} vectors ran");
}
