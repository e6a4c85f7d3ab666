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
/// Handshakes in progress at once, by default. When they are all taken, the one waiting longest
/// is dropped for the newcomer (logged as a failed handshake): a real client finishes its
/// handshake in milliseconds, so clients that connect and say nothing (or half a ClientHello)
/// cannot keep it out, however many they open.
pub const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress from one address, at most (a quarter of the whole, at least one): past
/// it, that address's own oldest is dropped, so one source cannot displace everyone else's.
fn per_source(max: usize) -> usize {
    (max / 4).max(1)
}
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

/// The handshakes in progress, oldest first, so the one waiting longest can be dropped.
#[derive(Default)]
struct InProgress {
    next: u64,
    by_age: std::collections::BTreeMap<u64, (SocketAddr, tokio::task::AbortHandle)>,
    per_ip: std::collections::HashMap<std::net::IpAddr, usize>,
}

impl InProgress {
    /// Makes room for one more from `ip`: drops that address's oldest if it holds its share, else
    /// the oldest of all if every slot is taken. Returns the dropped handshakes' peers.
    fn make_room(&mut self, ip: std::net::IpAddr, max: usize) -> Vec<SocketAddr> {
        let mut shed = Vec::new();
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= per_source(max)
            && let Some(id) = self.by_age.iter().find(|(_, (from, _))| from.ip() == ip).map(|(id, _)| *id)
        {
            shed.extend(self.drop_one(id));
        }
        while self.by_age.len() >= max {
            let Some(id) = self.by_age.keys().next().copied() else { break };
            shed.extend(self.drop_one(id));
        }
        shed
    }

    fn drop_one(&mut self, id: u64) -> Option<SocketAddr> {
        let (peer, task) = self.by_age.remove(&id)?;
        task.abort();
        self.forget_ip(peer.ip());
        Some(peer)
    }

    fn forget_ip(&mut self, ip: std::net::IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    fn finished(&mut self, id: u64) {
        if let Some((peer, _)) = self.by_age.remove(&id) {
            self.forget_ip(peer.ip());
        }
    }
}

/// Accepted connections with their handshake done, for `serve_with_incoming`; handshakes run
/// side by side, each bounded by [`HANDSHAKE_TIMEOUT`] and dropped early when newer ones need
/// the room (see [`MAX_HANDSHAKES`]). Accepting stops once the server drops the stream.
pub(super) fn incoming(
    listener: TcpListener,
    tls: ServerTls,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let log = Arc::new(FailureLog { window: Mutex::new((Instant::now(), 0, 0)) });
    let in_progress = Arc::new(Mutex::new(InProgress::default()));
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
            let _ = stream.set_nodelay(true);
            let (tx, acceptor, task_log, registry) =
                (tx.clone(), tls.acceptor.clone(), log.clone(), in_progress.clone());
            // Registered before it starts, so it can be dropped whether or not it has run yet.
            let mut progress = in_progress.lock().unwrap_or_else(|p| p.into_inner());
            for from in progress.make_room(peer.ip(), tls.max_handshakes) {
                let shed = std::io::Error::other(
                    "dropped unfinished to make room for a newer connection (too many TLS handshakes in progress)",
                );
                log.failed(from, &shed);
            }
            let id = progress.next;
            progress.next += 1;
            let task = tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        registry.lock().unwrap_or_else(|p| p.into_inner()).finished(id);
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        registry.lock().unwrap_or_else(|p| p.into_inner()).finished(id);
                        task_log.failed(peer, &e)
                    }
                    Err(_) => {
                        registry.lock().unwrap_or_else(|p| p.into_inner()).finished(id);
                        task_log.failed(peer, &std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))
                    }
                }
            });
            progress.by_age.insert(id, (peer, task.abort_handle()));
            *progress.per_ip.entry(peer.ip()).or_default() += 1;
            drop(progress);
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
