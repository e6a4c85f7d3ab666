//! TLS from the vault to a service it depends on (its database, a SIEM): rustls on ring,
//! trusting only the CA file the operator names. No system roots: a vault names the one
//! authority its peer's certificate comes from, so a certificate any public CA signed for that
//! name is not enough.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A client configuration trusting the certificates in the PEM file at `ca`, presenting the
/// certificate chain and key in the PEM files `identity` names when given (for a peer that
/// requires client certificates). The error says what is wrong with which file.
pub fn trusting(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<rustls::ClientConfig, String> {
    let bad = |what: &str, path: &Path, e: String| format!("{what} {}: {e}", path.display());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad("CA certificate", ca, e.to_string()))? {
        roots
            .add(cert.map_err(|e| bad("CA certificate", ca, e.to_string()))?)
            .map_err(|e| bad("CA certificate", ca, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("CA certificate", ca, "holds no certificate".into()));
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("CA certificate", ca, e.to_string()))?
            .with_root_certificates(roots);
    let Some((cert, key)) = identity else { return Ok(builder.with_no_client_auth()) };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad("client certificate", cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad("client certificate", cert, "holds no certificate".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("client key", key, e.to_string()))?;
    builder.with_client_auth_cert(chain, private).map_err(|e| bad("client key", key, e.to_string()))
}
