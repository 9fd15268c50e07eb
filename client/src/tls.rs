//! Where a websocket URL connects: its host's addresses, and TLS for `wss://` (rustls,
//! trusting the system's root certificates; as for OpenSSL, `SSL_CERT_FILE` (a PEM bundle) or
//! `SSL_CERT_DIR` replaces them: a private CA, or a test's).

use std::sync::{Arc, OnceLock};

use tokio_tungstenite::tungstenite::http::Uri;

/// The host and port `url` connects to (the port its scheme implies when it names none), the
/// host without an IPv6 literal's brackets.
pub(crate) fn host_port(url: &str) -> Result<(String, u16), String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad server URL {url}: {e}"))?;
    let default_port = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("ws") => 80,
        Some(s) if s.eq_ignore_ascii_case("wss") => 443,
        _ => return Err(format!("bad server URL {url}: not ws:// or wss://")),
    };
    let host = uri.host().ok_or_else(|| format!("bad server URL {url}: no host"))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    Ok((host.to_owned(), uri.port_u16().unwrap_or(default_port)))
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
