//! TLS from the vault to a service it depends on (its database, a SIEM): rustls on ring,
//! trusting only the CA file the operator names. No system roots: a vault names the one
//! authority its peer's certificate comes from, so a certificate any public CA signed for that
//! name is not enough.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;

/// A client configuration trusting the certificates in the PEM file at `ca`. The error says
/// what is wrong with the file (unreadable, not PEM, no certificate), naming it.
pub fn trusting(ca: &Path) -> Result<rustls::ClientConfig, String> {
    let bad = |what: String| format!("CA certificate {}: {what}", ca.display());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))? {
        roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
