//! What every gRPC client of tokenvault needs and nothing more: the interceptor that puts the
//! caller's bearer credential on each request. The CLI, the tests, the benches and a Rust web
//! tier use this one copy.
//!
//! Must never: log or print the credential; it is marked sensitive so HTTP/2 never adds it to
//! its header compression tables.

use tonic::metadata::{Ascii, MetadataValue};

/// The credential cannot be sent as a header value (it has characters outside visible ASCII).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the credential contains characters not allowed in a header")]
pub struct InvalidCredential;

/// Adds `authorization: Bearer <credential>` to every request; with no credential (a caller
/// identified by its client certificate) it adds nothing.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// A bearer for `credential`.
    pub fn new(credential: &str) -> Result<Self, InvalidCredential> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {credential}")
            .parse()
            .map_err(|_| InvalidCredential)?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }

    /// No credential at all.
    pub fn none() -> Self {
        Self(None)
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer([REDACTED])"
        } else {
            "Bearer(none)"
        })
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor as _;

    #[test]
    fn adds_the_credential_or_nothing_and_never_shows_it() {
        let mut b = Bearer::new("tv_secret_credential").expect("valid");
        let req = b.call(tonic::Request::new(())).expect("call");
        let v = req.metadata().get("authorization").expect("header");
        assert_eq!(v.to_str().expect("ascii"), "Bearer tv_secret_credential");
        assert!(v.is_sensitive());
        assert!(!format!("{b:?}").contains("secret"));
        let req = Bearer::none().call(tonic::Request::new(())).expect("call");
        assert!(req.metadata().get("authorization").is_none());
        assert_eq!(
            Bearer::new("bad\ncredential").err(),
            Some(InvalidCredential)
        );
    }
}
