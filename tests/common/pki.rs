//! Test certificates made with rcgen: a CA and leaves it signs.
#![allow(dead_code, reason = "each test binary uses a different part")]

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

pub struct Pki {
    pub ca_pem: String,
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

pub fn ca(name: &str) -> Pki {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let issuer =
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
    Pki {
        ca_pem: issuer.pem(),
        issuer,
    }
}

/// (certificate PEM, key PEM) for `sans`, signed by `pki`.
pub fn leaf(pki: &Pki, sans: &[&str], cn: &str) -> (String, String) {
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &pki.issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

/// Like [`leaf`], but valid only in 2020: expired now.
pub fn expired_leaf(pki: &Pki, sans: &[&str], cn: &str) -> (String, String) {
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 12, 31);
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &pki.issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}
