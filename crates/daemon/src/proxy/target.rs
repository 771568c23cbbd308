//! Where an upstream call may go: path validation, URL building and address classification.
//!
//! Pure functions, no I/O. Everything the SSRF guard decides before a socket is opened lives
//! here, so each refusal can be unit-tested on its own; `connect` applies [`check_addr`] again
//! to the address actually connected to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::Uri;
use percent_encoding::percent_decode_str;

use super::{ProviderPolicy, Refusal};

/// Why an address is special, or `None` for an ordinary public unicast address.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => {
            // Addresses that carry an IPv4 address reach it (through a translator, a relay or
            // the host's own stack), so they are judged by the IPv4 rules too.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return special_v4(v4);
            }
            let seg = v6.segments();
            let v4_at = |i: usize| {
                let [a, b] = seg[i].to_be_bytes();
                let [c, d] = seg[i + 1].to_be_bytes();
                Ipv4Addr::new(a, b, c, d)
            };
            // Well-known NAT64 prefix 64:ff9b::/96 (RFC 6052).
            if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
                return special_v4(v4_at(6)).map(|_| "NAT64-embedded special");
            }
            // Local-use NAT64 64:ff9b:1::/48 (RFC 8215): where the IPv4 address sits depends
            // on the operator's prefix length, so the whole prefix is refused.
            if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1 {
                return Some("local-use NAT64");
            }
            // 6to4 2002::/16 (RFC 3056): the IPv4 address follows the prefix.
            if seg[0] == 0x2002 {
                return special_v4(v4_at(1)).map(|_| "6to4-embedded special");
            }
            // Teredo 2001::/32 (RFC 4380): the server's IPv4 address, and the client's with
            // every bit inverted.
            if seg[0] == 0x2001 && seg[1] == 0 {
                let server = v4_at(2);
                let client = Ipv4Addr::from(!u32::from(v4_at(6)));
                return special_v4(server)
                    .or(special_v4(client))
                    .map(|_| "Teredo-embedded special");
            }
            // The deprecated IPv4-compatible form ::a.b.c.d (RFC 4291 2.5.5.1); :: and ::1 are
            // judged below as IPv6.
            if seg[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_unspecified() && !v6.is_loopback() {
                return special_v4(v4_at(6)).map(|_| "IPv4-compatible special");
            }
            special_v6(v6)
        }
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(match o {
        [169, 254, 169, 254] => "cloud metadata",
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private",
        _ if ip.is_link_local() => "link-local",
        _ if ip.is_unspecified() || o[0] == 0 => "unspecified",
        _ if ip.is_broadcast() => "broadcast",
        _ if ip.is_multicast() || o[0] >= 240 => "multicast or reserved",
        [100, b, ..] if (64..128).contains(&b) => "shared (CGNAT)",
        [192, 0, 0, _] => "IETF protocol assignment",
        [198, 18 | 19, ..] => "benchmarking",
        _ => return None,
    })
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(match first {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) => "cloud metadata",
        _ if first & 0xfe00 == 0xfc00 => "unique local (private)",
        _ if first & 0xffc0 == 0xfe80 => "link-local",
        _ if first & 0xffc0 == 0xfec0 => "site-local",
        _ if first & 0xff00 == 0xff00 => "multicast",
        0x2001 if ip.segments()[1] == 0x0db8 => "documentation",
        _ => return None,
    })
}

/// Whether the provider may reach `ip`: public unicast, or inside its `allowed_networks`.
pub fn check_addr(policy: &ProviderPolicy, ip: IpAddr) -> Result<(), Refusal> {
    let canonical = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if policy
        .allowed_networks
        .iter()
        .any(|n| n.contains(&canonical) || n.contains(&ip))
    {
        return Ok(());
    }
    match special_range(ip) {
        Some(why) => Err(Refusal(format!(
            "address {ip} is {why}; add it to the provider's allowed_networks to permit it"
        ))),
        None => Ok(()),
    }
}

/// Whether `host` is one of the provider's allowed hosts (exact, or a `.suffix` entry).
pub fn host_allowed(policy: &ProviderPolicy, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    policy.allowed_hosts.iter().any(|h| {
        h.strip_prefix('.')
            .map_or(host == *h, |suffix| host.ends_with(&format!(".{suffix}")))
    })
}

/// Checks a URL's scheme, userinfo and host (not yet its addresses): the checks shared by the
/// base URL, the token endpoint and every redirect target.
pub fn check_url(policy: &ProviderPolicy, uri: &Uri) -> Result<(), Refusal> {
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if policy.allow_plain_http => {}
        Some("http") => {
            return Err(Refusal(
                "plain http is refused; the provider must use https".into(),
            ));
        }
        _ => return Err(Refusal("only http(s) URLs are allowed".into())),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| Refusal("URL has no host".into()))?;
    if authority.as_str().contains('@') {
        return Err(Refusal("URLs with userinfo (user@host) are refused".into()));
    }
    let host = authority.host();
    match classify_host(host)? {
        Host::Ip(ip) => {
            if !policy.allowed_networks.iter().any(|n| n.contains(&ip)) {
                return Err(Refusal(format!(
                    "IP literal host {ip} is refused; name the host, or add it to allowed_networks"
                )));
            }
        }
        Host::Name(_) if !host_allowed(policy, host) => {
            return Err(Refusal(format!(
                "host {host} is not in the provider's allowed hosts"
            )));
        }
        Host::Name(_) => {}
    }
    Ok(())
}

/// A URL's host: a name to resolve, or an IP literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host<'a> {
    /// A registered name (resolved, then each address is checked).
    Name(&'a str),
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
}

/// Classifies `host` as it appears in a URL. A bracketed host is always an IP literal, so one
/// that does not parse (a zone-scoped `[fe80::1%25lo]` among them) is refused as such and is
/// never handed to the resolver as a name.
pub fn classify_host(host: &str) -> Result<Host<'_>, Refusal> {
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').unwrap_or(inner);
        if inner.contains('%') {
            return Err(Refusal(format!(
                "IP literal host {host} is refused: a zone-scoped IPv6 address names a local \
                 interface"
            )));
        }
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| {
                Refusal(format!(
                    "IP literal host {host} is not a valid IPv6 address"
                ))
            });
    }
    Ok(match host.parse::<IpAddr>() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => Host::Name(host),
    })
}

/// Validates a caller-supplied path (with optional query) and joins it to the provider's base
/// URL. Refuses anything that could leave the base URL: absolute URLs, `//host`, dot segments
/// (literal or percent-encoded, once or twice), backslashes, encoded slashes, fragments and
/// control characters.
pub fn join(policy: &ProviderPolicy, path_and_query: &str) -> Result<Uri, Refusal> {
    if !path_and_query.starts_with('/') {
        return Err(Refusal(
            "path must start with '/' (absolute URLs are refused)".into(),
        ));
    }
    if path_and_query.starts_with("//") {
        return Err(Refusal(
            "path must not start with '//' (a network-path reference)".into(),
        ));
    }
    if path_and_query.len() > 8192 {
        return Err(Refusal("path is longer than 8192 bytes".into()));
    }
    if let Some(c) = path_and_query
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || matches!(c, '\\' | '#'))
    {
        return Err(Refusal(format!(
            "path contains a forbidden character {c:?}"
        )));
    }
    let (path, query) = path_and_query
        .split_once('?')
        .map_or((path_and_query, None), |(p, q)| (p, Some(q)));
    for segment in path.split('/') {
        let decoded = decode_fully(segment)?;
        if decoded == "." || decoded == ".." {
            return Err(Refusal("path contains a dot segment ('..' or '.')".into()));
        }
        if decoded.contains(['/', '\\']) {
            return Err(Refusal(
                "path contains an encoded '/' or '\\' in a segment".into(),
            ));
        }
        if decoded.chars().any(char::is_control) {
            return Err(Refusal("path contains an encoded control character".into()));
        }
    }
    if let Some(query) = query {
        check_query(query)?;
    }
    let full = format!("{}{}", policy.base_path, path);
    if !policy
        .allowed_path_prefixes
        .iter()
        .any(|p| path_has_prefix(path, p))
    {
        return Err(Refusal(format!(
            "path {path} is outside the provider's allowed path prefixes"
        )));
    }
    let uri = format!(
        "{}://{}{}{}",
        policy.base.scheme_str().unwrap_or("https"),
        policy
            .base
            .authority()
            .map_or("", http::uri::Authority::as_str),
        full,
        query.map(|q| format!("?{q}")).unwrap_or_default()
    );
    let uri: Uri = uri
        .parse()
        .map_err(|_| Refusal("path is not a valid URL path".into()))?;
    // Defence in depth: the joined URL must still name the base authority.
    if uri.authority() != policy.base.authority() {
        return Err(Refusal("path changes the URL's host".into()));
    }
    Ok(uri)
}

/// The path's control-character rule applied to the query: no control character, literal or
/// percent-encoded (once or twice), e.g. `%0d%0a` or `%00`. Unlike a path segment, a query may
/// carry percent-encoded bytes that are not UTF-8.
fn check_query(query: &str) -> Result<(), Refusal> {
    let mut current = query.as_bytes().to_vec();
    for _ in 0..3 {
        let next: Vec<u8> = percent_encoding::percent_decode(&current).collect();
        let control = next.iter().any(|b| *b < 0x20 || *b == 0x7f)
            || std::str::from_utf8(&next).is_ok_and(|t| t.chars().any(char::is_control));
        if control {
            return Err(Refusal(
                "query contains an encoded control character".into(),
            ));
        }
        if next == current {
            break;
        }
        current = next;
    }
    Ok(())
}

/// Percent-decodes until stable (at most three rounds), so double encoding cannot hide `..`.
fn decode_fully(segment: &str) -> Result<String, Refusal> {
    let mut current = segment.to_string();
    for _ in 0..3 {
        let next = percent_decode_str(&current)
            .decode_utf8()
            .map_err(|_| Refusal("path contains percent-encoded bytes that are not UTF-8".into()))?
            .into_owned();
        if next == current {
            return Ok(current);
        }
        current = next;
    }
    Err(Refusal("path is percent-encoded more than twice".into()))
}

/// Prefix match on whole segments: `/repos` covers `/repos` and `/repos/x`, not `/reposx`;
/// a prefix ending in '/' matches anything below it.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" || prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Resolves a redirect `Location` against `current` and checks it stays on the same scheme,
/// host and port, within the path policy.
pub fn redirect(policy: &ProviderPolicy, current: &Uri, location: &str) -> Result<Uri, Refusal> {
    let target: Uri = if location.starts_with('/') && !location.starts_with("//") {
        let rest = location
            .strip_prefix(policy.base_path.as_str())
            .filter(|r| r.starts_with('/'))
            .ok_or_else(|| Refusal("redirect leaves the provider's base path".into()))?;
        join(policy, rest)?
    } else {
        let uri: Uri = location
            .parse()
            .map_err(|_| Refusal("redirect Location is not a valid URL".into()))?;
        if uri.scheme() != current.scheme() || uri.authority() != current.authority() {
            return Err(Refusal(format!(
                "redirect to another host or scheme ({}) refused; the credential is never \
                 forwarded elsewhere",
                uri.authority()
                    .map_or("no host", http::uri::Authority::as_str)
            )));
        }
        let pq = uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let rest = pq
            .strip_prefix(policy.base_path.as_str())
            .filter(|r| r.starts_with('/'))
            .ok_or_else(|| Refusal("redirect leaves the provider's base path".into()))?;
        join(policy, rest)?
    };
    check_url(policy, &target)?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(base: &str) -> ProviderPolicy {
        ProviderPolicy::for_tests(base)
    }

    #[test]
    fn classifies_special_addresses() {
        for (ip, why) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00::1", "unique local (private)"),
            ("fc00::1", "unique local (private)"),
            ("fe80::1", "link-local"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("64:ff9b::a9fe:a9fe", "NAT64-embedded special"),
            ("fd00:ec2::254", "cloud metadata"),
            // 6to4 of 127.0.0.1, 10.0.0.1 and 169.254.169.254.
            ("2002:7f00:1::", "6to4-embedded special"),
            ("2002:a00:1::1", "6to4-embedded special"),
            ("2002:a9fe:a9fe::", "6to4-embedded special"),
            ("64:ff9b:1::a9fe:a9fe", "local-use NAT64"),
            ("64:ff9b:1:ffff::808:808", "local-use NAT64"),
            // Teredo, client 127.0.0.1 (obfuscated as 80ff:fffe) behind a public server, and a
            // private server address.
            (
                "2001:0:4136:e378:8000:63bf:80ff:fffe",
                "Teredo-embedded special",
            ),
            ("2001:0:a00:1::f7f7:f7f7", "Teredo-embedded special"),
            ("::127.0.0.1", "IPv4-compatible special"),
            ("::a9fe:a9fe", "IPv4-compatible special"),
            ("::10.1.2.3", "IPv4-compatible special"),
        ] {
            assert_eq!(special_range(ip.parse().expect("ip")), Some(why), "{ip}");
        }
        // The same forms embedding public addresses are ordinary (Teredo: server 65.54.227.120,
        // client 8.8.8.8, obfuscated as f7f7:f7f7).
        for ip in [
            "8.8.8.8",
            "140.82.112.3",
            "2606:4700::1111",
            "2002:808:808::",
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
            "::8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(special_range(ip.parse().expect("ip")), None, "{ip}");
        }
    }

    #[test]
    fn allowed_networks_override_special_ranges() {
        let mut p = policy("https://api.example.com");
        assert!(check_addr(&p, "127.0.0.1".parse().expect("ip")).is_err());
        p.allowed_networks = vec!["127.0.0.0/8".parse().expect("net")];
        assert!(check_addr(&p, "127.0.0.1".parse().expect("ip")).is_ok());
        assert!(check_addr(&p, "::ffff:127.0.0.1".parse().expect("ip")).is_ok());
        assert!(check_addr(&p, "10.0.0.1".parse().expect("ip")).is_err());
    }

    #[test]
    fn joins_safe_paths_and_refuses_escapes() {
        let p = policy("https://api.example.com/v3");
        assert_eq!(
            join(&p, "/user/repos?per_page=5&q=a%20b")
                .expect("ok")
                .to_string(),
            "https://api.example.com/v3/user/repos?per_page=5&q=a%20b"
        );
        // Encoded bytes that are not UTF-8, and encoded reserved characters, stay allowed in
        // the query.
        for q in [
            "/a?sig=%ff%fe",
            "/a?redirect=https%3A%2F%2Fx%2Fy",
            "/a?t=%2520",
        ] {
            assert!(join(&p, q).is_ok(), "{q}");
        }
        for (path, why) in [
            ("https://evil.example/", "must start with '/'"),
            ("//evil.example/x", "network-path"),
            ("/a/../../admin", "dot segment"),
            ("/a/%2e%2e/admin", "dot segment"),
            ("/a/%252e%252e/admin", "dot segment"),
            ("/a/%2E./admin", "dot segment"),
            ("/a/%2fadmin", "encoded '/'"),
            ("/a/%5c..", "encoded '/'"),
            ("/a\\..\\admin", "forbidden character"),
            ("/a#frag", "forbidden character"),
            ("/a b", "forbidden character"),
            ("/a/%00", "control"),
            ("@evil.example/x", "must start with '/'"),
            ("/%25252e%25252e", "more than twice"),
            (
                "/a?x=1%0d%0aHost:%20evil",
                "query contains an encoded control character",
            ),
            ("/a?x=%00", "query contains an encoded control character"),
            ("/a?x=a%0ab", "query contains an encoded control character"),
            ("/a?x=%7f", "query contains an encoded control character"),
            ("/a?x=%250a", "query contains an encoded control character"),
            ("/a?x=%c2%85", "query contains an encoded control character"),
            ("/a?x=\u{1}", "forbidden character"),
        ] {
            let err = join(&p, path).expect_err(path);
            assert!(err.0.contains(why), "{path}: {}", err.0);
        }
    }

    #[test]
    fn path_prefixes_match_whole_segments() {
        assert!(path_has_prefix("/repos", "/repos"));
        assert!(path_has_prefix("/repos/x", "/repos"));
        assert!(!path_has_prefix("/reposx", "/repos"));
        assert!(path_has_prefix("/user/x", "/user/"));
        assert!(!path_has_prefix("/user", "/user/"));
    }

    #[test]
    fn checks_scheme_host_userinfo_and_ip_literals() {
        let mut p = policy("https://api.example.com");
        p.allowed_hosts = vec!["api.example.com".into(), ".uploads.example.com".into()];
        let ok = |u: &str| check_url(&p, &u.parse().expect("uri"));
        assert!(ok("https://api.example.com/x").is_ok());
        assert!(ok("https://a.uploads.example.com/x").is_ok());
        assert!(ok("https://uploads.example.com.evil/x").is_err());
        assert!(ok("https://evil.example/x").is_err());
        assert!(ok("http://api.example.com/x").is_err());
        assert!(ok("ftp://api.example.com/x").is_err());
        assert!(ok("https://user:pw@api.example.com/x").is_err());
        assert!(ok("https://169.254.169.254/latest").is_err());
        assert!(ok("https://[fd00::1]/x").is_err());
        // A zone-scoped literal is an IP literal too, refused before any resolver sees it.
        let err = ok("https://[fe80::1%25lo]/").expect_err("zone");
        assert!(
            err.0
                .starts_with("IP literal host [fe80::1%25lo] is refused"),
            "{}",
            err.0
        );
        // Even a policy that names it as a host and allows link-local addresses.
        let mut open = p.clone();
        open.allowed_hosts.push("[fe80::1%25lo]".into());
        open.allowed_hosts.push("fe80::1%25lo".into());
        open.allowed_networks = vec!["fe80::/10".parse().expect("net")];
        open.allow_plain_http = true;
        for u in ["http://[fe80::1%25lo]/", "https://[fe80::1%25eth0]/"] {
            assert!(check_url(&open, &u.parse().expect("uri")).is_err(), "{u}");
        }
        assert_eq!(
            classify_host("[2606:4700::1111]"),
            Ok(Host::Ip("2606:4700::1111".parse().expect("ip")))
        );
        assert_eq!(
            classify_host("api.example.com"),
            Ok(Host::Name("api.example.com"))
        );
        assert!(classify_host("[not-an-ip]").is_err());
    }

    #[test]
    fn redirects_stay_on_the_same_host() {
        let p = policy("https://api.example.com/v3");
        let here: Uri = "https://api.example.com/v3/a".parse().expect("uri");
        assert_eq!(
            redirect(&p, &here, "/v3/b").expect("same host").to_string(),
            "https://api.example.com/v3/b"
        );
        assert_eq!(
            redirect(&p, &here, "https://api.example.com/v3/c")
                .expect("absolute same host")
                .to_string(),
            "https://api.example.com/v3/c"
        );
        assert!(redirect(&p, &here, "https://evil.example/v3/b").is_err());
        assert!(redirect(&p, &here, "//evil.example/v3/b").is_err());
        assert!(redirect(&p, &here, "http://api.example.com/v3/b").is_err());
        assert!(redirect(&p, &here, "/other").is_err());
        assert!(redirect(&p, &here, "http://169.254.169.254/").is_err());
    }
}
