//! The proxy's path joining and redirect checks: any caller path or `Location` is refused or
//! yields a URL on the provider's own scheme, host and port under its base path, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenvault::proxy::ProviderPolicy;
use tokenvault::proxy::target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = ProviderPolicy::for_tests("https://api.example.com/v3");
    let check = |uri: &http::Uri| {
        assert_eq!(uri.scheme_str(), Some("https"));
        assert_eq!(uri.authority().map(|a| a.as_str()), Some("api.example.com"));
        assert!(uri.path().starts_with("/v3/") || uri.path() == "/v3");
        assert!(!uri.path().split('/').any(|s| s == ".." || s == "."));
    };
    if let Ok(uri) = target::join(&policy, text) {
        check(&uri);
    }
    let here: http::Uri = "https://api.example.com/v3/a".parse().expect("uri");
    if let Ok(uri) = target::redirect(&policy, &here, text) {
        check(&uri);
    }
});
