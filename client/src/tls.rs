//! TLS for `wss://` servers: rustls, trusting the system's root certificates. As for OpenSSL,
//! `SSL_CERT_FILE` (a PEM bundle) or `SSL_CERT_DIR` replaces them: a private CA, or a test's.

use std::sync::{Arc, OnceLock};

/// The TLS configuration for `url`: for `wss://`, `None` for `ws://`. The roots are loaded
/// once per process; without any, a `wss://` connection fails saying so.
pub(crate) fn config_for(url: &str) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if !pagesync::protocol::has_scheme(url, "wss://") {
        return Ok(None);
    }
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG.get_or_init(client_config).clone().map(Some)
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
