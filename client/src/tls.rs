//! Where a websocket URL connects: its host's addresses, and TLS for `wss://` (rustls,
//! trusting the system's root certificates; as for OpenSSL, `SSL_CERT_FILE` (a PEM bundle) or
//! `SSL_CERT_DIR` replaces them: a private CA, or a test's).

use std::sync::{Arc, OnceLock};

use tokio_tungstenite::tungstenite::http::Uri;

/// The host and port `url` connects to (the port its scheme implies when it names none), the
/// host without an IPv6 literal's brackets.
pub(crate) fn host_port(url: &str) -> Result<(String, u16), String> {
    // A password in the URL is never printed back.
    let after_scheme = url.find("://").map_or(0, |at| at + 3);
    let authority_end = url[after_scheme..].find(['/', '?', '#']).map_or(url.len(), |at| after_scheme + at);
    let userinfo = url[after_scheme..authority_end].rfind('@').map(|at| after_scheme + at);
    let shown = match userinfo {
        Some(at) => format!("{}***{}", &url[..after_scheme], &url[at..]),
        None => url.to_owned(),
    };
    let bad = |why: &str| {
        format!("bad server URL {shown}: {why} (a server's is ws://HOST:PORT/v1/sync, or wss://)")
    };
    if userinfo.is_some() {
        return Err(bad(
            "a user or password in the URL is not sent; pass a token with --token (or PAGESYNC_TOKEN)",
        ));
    }
    let uri = url.parse::<Uri>().map_err(|e| bad(&e.to_string()))?;
    let default_port = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("ws") => 80,
        Some(s) if s.eq_ignore_ascii_case("wss") => 443,
        _ => return Err(bad("not ws:// or wss://")),
    };
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    // A port that is not a number from 1 to 65535 is an error, not the scheme's default.
    let authority = uri.authority().map_or("", |a| a.as_str());
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let after_host = authority.rsplit_once(']').map_or(authority, |(_, rest)| rest);
    let port = match after_host.rsplit_once(':') {
        Some((_, port)) => match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad(&format!("port {port:?} is not a number from 1 to 65535"))),
        },
        None => default_port,
    };
    Ok((host.to_owned(), port))
}

/// The TLS configuration for `url`: for `wss://`, `None` for `ws://`. The roots are loaded
/// once per process (until they load, every attempt tries again); without any, a `wss://`
/// connection fails saying so.
pub(crate) fn config_for(url: &str) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if !pagesync::protocol::has_scheme(url, "wss://") {
        return Ok(None);
    }
    // Only a success is kept: roots installed (or `SSL_CERT_FILE` fixed) later are found.
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    if let Some(config) = CONFIG.get() {
        return Ok(Some(config.clone()));
    }
    let config = client_config()?;
    Ok(Some(CONFIG.get_or_init(|| config).clone()))
}

fn client_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(format!(
            "no trusted root certificates for wss:// (install the system's CA certificates, or set \
             SSL_CERT_FILE to a PEM bundle){}",
            if errors.is_empty() { String::new() } else { format!(": {}", errors.join("; ")) }
        ));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn hosts_and_ports() {
        for (url, want) in [
            ("ws://127.0.0.1:8787/v1/sync", ("127.0.0.1", 8787)),
            ("ws://127.0.0.1/v1/sync", ("127.0.0.1", 80)),
            ("wss://example.com/v1/sync", ("example.com", 443)),
            ("WS://[::1]:9000/v1/sync", ("::1", 9000)),
            ("ws://[::1]/v1/sync", ("::1", 80)),
        ] {
            let (host, port) = host_port(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!((host.as_str(), port), want, "{url}");
        }
        for url in [
            "http://127.0.0.1:8787/v1/sync",
            "ws://127.0.0.1:abc/v1/sync",
            "ws://127.0.0.1:99999/",
            "ws://h:0/",
        ] {
            assert!(host_port(url).is_err(), "{url}");
        }
        // Credentials in the URL would not be sent: refused, and the password is not shown.
        for url in
            ["ws://user:hunter2@127.0.0.1/v1/sync", "ws://user:hunter2@[::1]:81/v1/sync", "wss://hunter2@h/"]
        {
            let why = host_port(url).expect_err(url);
            assert!(!why.contains("hunter2") && why.contains("--token"), "{why}");
        }
        assert!(host_port("ws://127.0.0.1/v1/sync?at=x@y").is_ok(), "an @ after the host is not a user");
    }
}
