//! TLS for the gRPC listener: rustls on ring, the handshake done here rather than inside tonic so
//! that a failed one is logged with the peer's address (tonic logs it only at debug, without
//! the address). Certificates reach the handlers as tonic's own TLS connection info, so client
//! certificate authentication reads them as before.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once, by default: a connection beyond them is closed at once (and
/// logged as a failed handshake), so clients that connect and say nothing cannot pile up tasks
/// and sockets for [`HANDSHAKE_TIMEOUT`] each.
pub const MAX_HANDSHAKES: usize = 256;
/// At most this many failed handshakes are logged one by one per window; the rest are counted
/// into one line, so a client that fails on purpose cannot flood the log.
const LOGGED_PER_WINDOW: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("the certificate file holds no PEM certificate")]
    NoCertificate,
    #[error("the key file holds no PEM private key")]
    NoKey,
    #[error("the client CA file holds no usable PEM certificate")]
    NoClientCa,
    #[error("TLS: {0}")]
    Rustls(String),
}

/// The server's TLS settings: its certificate chain and key, and the CA whose client
/// certificates it accepts (required unless `client_auth_optional`).
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    max_handshakes: usize,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls(..)")
    }
}

impl ServerTls {
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        client_ca_pem: Option<&[u8]>,
        client_auth_optional: bool,
    ) -> Result<Self, TlsSetupError> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem).filter_map(Result::ok).collect();
        if certs.is_empty() {
            return Err(TlsSetupError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsSetupError::NoKey)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let rustls_error = |e: rustls::Error| TlsSetupError::Rustls(e.to_string());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(rustls_error)?;
        let builder = match client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem).filter_map(Result::ok) {
                    roots.add(cert).map_err(|_| TlsSetupError::NoClientCa)?;
                }
                if roots.is_empty() {
                    return Err(TlsSetupError::NoClientCa);
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if client_auth_optional { verifier.allow_unauthenticated() } else { verifier };
                builder.with_client_cert_verifier(
                    verifier.build().map_err(|e| TlsSetupError::Rustls(e.to_string()))?,
                )
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(rustls_error)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { acceptor: TlsAcceptor::from(Arc::new(config)), max_handshakes: MAX_HANDSHAKES })
    }

    /// How many handshakes may be in progress at once (default [`MAX_HANDSHAKES`]).
    pub fn max_handshakes(mut self, n: usize) -> Self {
        self.max_handshakes = n.max(1);
        self
    }
}

/// Counts failed handshakes for the log (see [`LOGGED_PER_WINDOW`]).
struct FailureLog {
    window: Mutex<(Instant, u32, u64)>,
}

impl FailureLog {
    fn failed(&self, peer: SocketAddr, error: &std::io::Error) {
        crate::metrics::tls_handshake_failed();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.0.elapsed() >= LOG_WINDOW {
            if w.2 > 0 {
                tracing::warn!(more = w.2, "more TLS handshakes failed (not logged one by one)");
            }
            *w = (Instant::now(), 0, 0);
        }
        if w.1 < LOGGED_PER_WINDOW {
            w.1 += 1;
            tracing::warn!(peer = %peer, error = %error, "TLS handshake failed");
        } else {
            w.2 += 1;
        }
    }
}

/// Accepted connections with their handshake done, for `serve_with_incoming`; handshakes run
/// side by side, each bounded by [`HANDSHAKE_TIMEOUT`]. Accepting stops once the server drops
/// the stream.
pub(super) fn incoming(
    listener: TcpListener,
    tls: ServerTls,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let log = Arc::new(FailureLog { window: Mutex::new((Instant::now(), 0, 0)) });
    let slots = Arc::new(tokio::sync::Semaphore::new(tls.max_handshakes));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => break,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off a moment rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(stream);
                let busy = std::io::Error::other("too many TLS handshakes in progress; connection closed");
                log.failed(peer, &busy);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (tx, acceptor, log) = (tx.clone(), tls.acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => log.failed(peer, &e),
                    Err(_) => {
                        log.failed(peer, &std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
