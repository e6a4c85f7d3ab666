//! Streaming audit entries to a SIEM: each entry, as its canonical JSON (no value, no subject id —
//! only what the log itself holds), also goes to a file as JSON Lines or to a syslog receiver as
//! RFC 5424 over UDP, over TCP (octet-counted, RFC 6587) or over TLS (RFC 5425). Best-effort and
//! never a substitute for the log: a request never waits for it (a bounded queue; what does not
//! fit is counted, logged and dropped), a receiver that is away loses entries, and the log's own
//! files and proofs are what an officer verifies. An entry goes out only once the log holds it
//! durably ([`DurableMark`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// Entries waiting for the sink's thread before new ones are dropped.
const QUEUE: usize = 16 * 1024;
/// RFC 5424 PRI: facility 13 (log audit) × 8 + severity 6 (informational).
const SYSLOG_PRI: u8 = 13 * 8 + 6;
/// RFC 5424's APP-NAME and MSGID for these messages.
const APP_NAME: &str = "khlangd";
const MSG_ID: &str = "audit";
/// After this many drops in a row, one more line says how many were dropped.
const DROPS_PER_LINE: u64 = 1000;
/// A stream receiver that is away is tried again at most this often (entries meanwhile are lost
/// to the sink, counted, and kept by the log).
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// Reads of what a receiver sent before a batch; a receiver still sending after them is dropped.
const MAX_READS_PER_CHECK: u32 = 64;
/// Connecting, the TLS handshake and each write give up after this long.
const STREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// The syslog schemes, their transport and default port: UDP (RFC 5426), TCP with octet counting
/// (RFC 6587; 601 is syslog's registered TCP port), TLS (RFC 5425).
const SYSLOG_SCHEMES: [(&str, Transport, u16); 3] = [
    ("syslog://", Transport::Udp, 514),
    ("syslog+tcp://", Transport::Tcp, 601),
    ("syslog+tls://", Transport::Tls, 6514),
];

/// How syslog messages travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// Where entries are streamed: `file:///absolute/path` (JSON Lines, appended), or a syslog
/// receiver `syslog://host[:port]` (UDP), `syslog+tcp://…` or `syslog+tls://…` (the receiver's
/// certificate checked against `ca`, which TLS requires; `identity`, a certificate and key file,
/// presented to a receiver that requires one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkTarget {
    File(PathBuf),
    Syslog { addr: String, transport: Transport, ca: Option<PathBuf>, identity: Option<(PathBuf, PathBuf)> },
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(
        "an audit sink is file:///absolute/path, syslog://host[:port] (UDP), syslog+tcp://host[:port] or syslog+tls://host[:port], not '{0}'"
    )]
    Unknown(String),
    #[error("cannot open the audit sink {0}: {1}")]
    Open(String, std::io::Error),
    #[error(
        "the audit sink {0} is TLS: name the CA that signs the receiver's certificate (--audit-sink-ca FILE)"
    )]
    NoCa(String),
    #[error(
        "--audit-sink-ca, --audit-sink-cert and --audit-sink-key are only for a syslog+tls:// sink, not {0}"
    )]
    CaWithoutTls(String),
    #[error("the audit sink {0}: {1}")]
    Tls(String, String),
}

impl SinkTarget {
    /// The CA file for a `syslog+tls://` target; refused for any other.
    pub fn with_ca(self, ca: PathBuf) -> Result<Self, SinkError> {
        match self {
            Self::Syslog { addr, transport: Transport::Tls, identity, .. } => {
                Ok(Self::Syslog { addr, transport: Transport::Tls, ca: Some(ca), identity })
            }
            other => Err(SinkError::CaWithoutTls(other.to_string())),
        }
    }

    /// The client certificate and key files a `syslog+tls://` target presents; refused for any
    /// other.
    pub fn with_identity(self, cert: PathBuf, key: PathBuf) -> Result<Self, SinkError> {
        match self {
            Self::Syslog { addr, transport: Transport::Tls, ca, .. } => {
                Ok(Self::Syslog { addr, transport: Transport::Tls, ca, identity: Some((cert, key)) })
            }
            other => Err(SinkError::CaWithoutTls(other.to_string())),
        }
    }
}

impl std::str::FromStr for SinkTarget {
    type Err = SinkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(SinkError::Unknown(s.to_owned()));
            }
            return Ok(Self::File(PathBuf::from(path)));
        }
        for (scheme, transport, port) in SYSLOG_SCHEMES {
            let Some(host) = s.strip_prefix(scheme) else { continue };
            let host = host.trim_end_matches('/');
            if host.is_empty() || host.contains('/') {
                return Err(SinkError::Unknown(s.to_owned()));
            }
            let addr = if host.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
                host.to_owned()
            } else {
                format!("{host}:{port}")
            };
            return Ok(Self::Syslog { addr, transport, ca: None, identity: None });
        }
        Err(SinkError::Unknown(s.to_owned()))
    }
}

impl std::fmt::Display for SinkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "file://{}", p.display()),
            Self::Syslog { addr, transport, .. } => {
                let scheme =
                    SYSLOG_SCHEMES.iter().find(|(_, t, _)| t == transport).map_or("syslog://", |s| s.0);
                write!(f, "{scheme}{addr}")
            }
        }
    }
}

/// An entry waiting for the sink's thread: its seq, time and canonical JSON.
type Queued = (u64, u64, Vec<u8>);

/// How far the log is durable. With it, the sink sends an entry only once the log holds it, so a
/// SIEM never names an entry a crash took from the log. An entry is durable once the log's files
/// are synced past it (`file`: the seq synced, or why the log failed), or once the store's flush
/// after the change that carried it returned (`store`: a change's commit carries every entry
/// before it not yet synced, so everything up to it is durable then).
pub struct DurableMark {
    pub file: tokio::sync::watch::Receiver<Result<u64, String>>,
    pub store: tokio::sync::watch::Receiver<u64>,
}

/// How long an entry waits to become durable before it is dropped from the stream (the log
/// has failed, or is stalled: either is logged by the log itself).
const DURABLE_WAIT: Duration = Duration::from_secs(10);

/// The sending end: [`AuditSink::send`] never blocks.
pub struct AuditSink {
    tx: SyncSender<Queued>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditSink(..)")
    }
}

enum Out {
    File(std::io::BufWriter<std::fs::File>),
    Syslog { socket: UdpSocket, hostname: String, pid: u32 },
    Stream(Box<StreamOut>),
}

/// A syslog receiver over TCP or TLS: connected on first use, again after it goes away (at most
/// every [`RECONNECT_EVERY`]).
struct StreamOut {
    addr: String,
    tls: Option<(Arc<rustls::ClientConfig>, rustls_pki_types::ServerName<'static>)>,
    conn: Option<Conn>,
    next_attempt: Instant,
    /// When the connection was made, and why the last one ended: a connection refused right
    /// after its handshake (a receiver rejecting the vault's certificate) waits for the next
    /// attempt and is logged once, not once per batch.
    connected_at: Instant,
    last_end: Option<String>,
    hostname: String,
    pid: u32,
}

enum Conn {
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn socket(&self) -> &TcpStream {
        match self {
            Self::Tcp(s) => s,
            Self::Tls(s) => &s.sock,
        }
    }

    /// Why the connection is no longer usable, or `None` while the receiver holds it. A write
    /// to a socket the peer has closed succeeds once and is lost, so the sink looks before each
    /// batch: syslog receivers send nothing, so end-of-stream (or, over TLS, a close or an alert,
    /// such as a receiver refusing the vault's certificate) means it has gone; so does one that
    /// keeps sending (it would hold the sink's thread here).
    fn gone(&mut self) -> Option<String> {
        if let Err(e) = self.socket().set_nonblocking(true) {
            return Some(e.to_string());
        }
        let mut reads = 0;
        let gone = loop {
            let mut byte = [0u8; 1];
            match self.socket().peek(&mut byte) {
                Ok(0) => break Some("the receiver closed the connection".to_owned()),
                Ok(_) if reads == MAX_READS_PER_CHECK => {
                    break Some("the receiver keeps sending (a syslog receiver sends nothing)".to_owned());
                }
                Ok(_) => match self {
                    // Plaintext from a syslog receiver means nothing: read and ignore it.
                    Self::Tcp(s) => {
                        reads += 1;
                        let mut sink = [0u8; 512];
                        if let Err(e) = s.read(&mut sink) {
                            break Some(e.to_string());
                        }
                    }
                    // TLS 1.3 session tickets arrive after the handshake; a close_notify or
                    // an alert ends the connection.
                    Self::Tls(s) => {
                        reads += 1;
                        let (conn, sock) = (&mut s.conn, &mut s.sock);
                        if let Err(e) = conn.read_tls(sock) {
                            break Some(e.to_string());
                        }
                        match conn.process_new_packets() {
                            Ok(state) if state.peer_has_closed() => {
                                break Some("the receiver closed the TLS session".to_owned());
                            }
                            Ok(state) => {
                                let mut ignored = vec![0u8; state.plaintext_bytes_to_read()];
                                if let Err(e) = conn.reader().read_exact(&mut ignored) {
                                    break Some(e.to_string());
                                }
                            }
                            Err(e) => break Some(format!("TLS: {e}")),
                        }
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                Err(e) => break Some(e.to_string()),
            }
        };
        match (gone, self.socket().set_nonblocking(false)) {
            (None, Err(e)) => Some(e.to_string()),
            (gone, _) => gone,
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.write_all(bytes),
            Self::Tls(s) => s.write_all(bytes).and_then(|()| s.flush()),
        }
    }
}

impl StreamOut {
    fn connect(&mut self) -> std::io::Result<()> {
        let now = Instant::now();
        if now < self.next_attempt {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the receiver is away (tried again within a second)",
            ));
        }
        self.next_attempt = now + RECONNECT_EVERY;
        let to =
            self.addr.to_socket_addrs()?.next().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "the host has no address")
            })?;
        let tcp = TcpStream::connect_timeout(&to, STREAM_TIMEOUT)?;
        tcp.set_write_timeout(Some(STREAM_TIMEOUT))?;
        tcp.set_read_timeout(Some(STREAM_TIMEOUT))?;
        tcp.set_nodelay(true)?;
        self.conn = Some(match &self.tls {
            None => Conn::Tcp(tcp),
            Some((config, name)) => {
                let conn = rustls::ClientConnection::new(config.clone(), name.clone())
                    .map_err(std::io::Error::other)?;
                let mut stream = rustls::StreamOwned::new(conn, tcp);
                // The handshake now, so a certificate the CA did not sign is reported as such.
                while stream.conn.is_handshaking() {
                    stream.conn.complete_io(&mut stream.sock)?;
                }
                Conn::Tls(Box::new(stream))
            }
        });
        self.connected_at = Instant::now();
        tracing::info!(sink = %self.addr, tls = self.tls.is_some(), "audit sink connected");
        Ok(())
    }

    /// Sends one octet-counted message. A connection whose write fails is replaced and the
    /// message sent again once, if the connection had lived a while (a receiver restarted since
    /// the last entry); one that failed soon after it was made waits for the next attempt.
    fn send(&mut self, msg: &[u8]) -> std::io::Result<()> {
        let mut frame = format!("{} ", msg.len()).into_bytes();
        frame.extend_from_slice(msg);
        let mut tries = 2;
        loop {
            if self.conn.is_none() {
                self.connect()?;
            }
            let Some(conn) = self.conn.as_mut() else { return Err(std::io::ErrorKind::NotConnected.into()) };
            tries -= 1;
            match conn.write_all(&frame) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // What the receiver said before it closed (a TLS alert) says more than the
                    // write's broken pipe.
                    let why = conn.gone().unwrap_or_else(|| e.to_string());
                    self.ended(why);
                    if tries == 0 {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Before a batch: drop a connection the receiver has closed, so the batch goes to a new one.
    fn check(&mut self) {
        if let Some(why) = self.conn.as_mut().and_then(Conn::gone) {
            self.ended(why);
        }
    }

    /// Drops the connection, which ended for `why`. One that had lived a while is replaced at
    /// once and logged; one that ended soon after it was made (a receiver refusing the vault's
    /// certificate ends each right after the handshake) waits for the next attempt and is logged
    /// only when its reason changes: one handshake a second and one line, not one per entry.
    fn ended(&mut self, why: String) {
        let brief = self.connected_at.elapsed() < RECONNECT_EVERY;
        if !brief || self.last_end.as_deref() != Some(why.as_str()) {
            tracing::warn!(sink = %self.addr, reason = %why, "the audit sink's connection ended; reconnecting");
        }
        self.last_end = Some(why);
        self.conn = None;
        if !brief {
            self.next_attempt = Instant::now();
        }
    }
}

impl AuditSink {
    /// Opens the target (a file is created 0600 if missing; a syslog host must resolve) and
    /// starts the thread that writes to it. With `durable`, each entry waits until the log's files hold it (see [`DurableMark`]).
    pub fn start(target: &SinkTarget, durable: Option<DurableMark>) -> Result<Self, SinkError> {
        let open_error = |e| SinkError::Open(target.to_string(), e);
        let out = match target {
            SinkTarget::File(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(open_error)?;
                Out::File(std::io::BufWriter::new(file))
            }
            SinkTarget::Syslog { addr, transport: Transport::Udp, .. } => {
                let to: SocketAddr = addr
                    .to_socket_addrs()
                    .map_err(open_error)?
                    .next()
                    .ok_or_else(|| open_error(std::io::ErrorKind::NotFound.into()))?;
                let local: SocketAddr =
                    if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
                let socket = UdpSocket::bind(local).map_err(open_error)?;
                socket.connect(to).map_err(open_error)?;
                Out::Syslog { socket, hostname: hostname(), pid: std::process::id() }
            }
            SinkTarget::Syslog { addr, transport, ca, identity } => {
                let tls = match (transport, ca) {
                    (Transport::Tls, None) => return Err(SinkError::NoCa(target.to_string())),
                    (Transport::Tls, Some(ca)) => {
                        let identity = identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
                        let config = crate::tls_client::trusting(ca, identity)
                            .map_err(|e| SinkError::Tls(target.to_string(), e))?;
                        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                        let host = host.trim_start_matches('[').trim_end_matches(']');
                        let name = rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|_| {
                            SinkError::Tls(target.to_string(), format!("'{host}' is not a host name"))
                        })?;
                        Some((Arc::new(config), name))
                    }
                    _ => None,
                };
                Out::Stream(Box::new(StreamOut {
                    addr: addr.clone(),
                    tls,
                    conn: None,
                    next_attempt: Instant::now(),
                    connected_at: Instant::now(),
                    last_end: None,
                    hostname: hostname(),
                    pid: std::process::id(),
                }))
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let name = target.to_string();
        std::thread::Builder::new()
            .name("khlang-audit-sink".into())
            .spawn(move || write_all(rx, out, &name, durable))
            .map_err(open_error)?;
        Ok(Self { tx, dropped: Arc::default() })
    }

    /// Queues entry `seq` (`json`, its canonical JSON) written at `time_ms`; drops it when the
    /// queue is full (the sink is slower than the vault, or away).
    pub fn send(&self, seq: u64, time_ms: u64, json: &[u8]) {
        match self.tx.try_send((seq, time_ms, json.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                crate::metrics::audit_sink_dropped();
                if n == 1 || n.is_multiple_of(DROPS_PER_LINE) {
                    tracing::warn!(
                        dropped = n,
                        "the audit sink is behind: entries not streamed (the log has them)"
                    );
                }
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| "-".to_owned())
}

/// One RFC 5424 message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG`.
pub fn rfc5424(time_ms: u64, hostname: &str, pid: u32, json: &[u8]) -> Vec<u8> {
    let time = i64::try_from(time_ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map_or_else(|| "-".to_owned(), |t| t.to_string());
    let mut msg =
        format!("<{SYSLOG_PRI}>1 {time} {hostname} {APP_NAME} {pid} {MSG_ID} - \u{feff}").into_bytes();
    msg.extend_from_slice(json);
    msg
}

fn is_durable(mark: &DurableMark, seq: u64) -> bool {
    *mark.store.borrow() >= seq || matches!(&*mark.file.borrow(), Ok(synced) if *synced >= seq)
}

/// Whether entry `seq` is on disk, waiting up to [`DURABLE_WAIT`] (polled: the log syncs every
/// few milliseconds, and this thread has nothing else to do meanwhile).
fn wait_durable(mark: &DurableMark, seq: u64) -> Result<(), String> {
    let deadline = Instant::now() + DURABLE_WAIT;
    loop {
        if is_durable(mark, seq) {
            return Ok(());
        }
        if let Err(e) = &*mark.file.borrow() {
            return Err(format!("the audit log failed ({e}): entry {seq} is not sent"));
        }
        if Instant::now() >= deadline {
            return Err(format!("entry {seq} was not on disk within {DURABLE_WAIT:?}: not sent"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn write_all(rx: Receiver<Queued>, mut out: Out, name: &str, durable: Option<DurableMark>) {
    let mut failures = 0u64;
    // Each outage's first failure is logged, then every thousandth.
    let mut failing = false;
    while let Ok(first) = rx.recv() {
        if let Out::Stream(s) = &mut out {
            s.check();
        }
        // Everything waiting now, then one flush: the file is never far behind.
        for (seq, time_ms, json) in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            if let (Some(mark), Out::File(w)) = (&durable, &mut out)
                && !is_durable(mark, seq)
            {
                // What is written so far goes out before this entry waits for its sync.
                let _ = w.flush();
            }
            if let Some(Err(e)) = durable.as_ref().map(|mark| wait_durable(mark, seq)) {
                failures += 1;
                crate::metrics::audit_sink_dropped();
                if !failing || failures.is_multiple_of(DROPS_PER_LINE) {
                    tracing::warn!(sink = %name, error = %e, failures, "the audit sink did not send an entry");
                }
                failing = true;
                continue;
            }
            let written = match &mut out {
                Out::File(w) => w.write_all(&json).and_then(|_| w.write_all(b"\n")),
                Out::Syslog { socket, hostname, pid } => {
                    socket.send(&rfc5424(time_ms, hostname, *pid, &json)).map(|_| ())
                }
                Out::Stream(s) => {
                    let msg = rfc5424(time_ms, &s.hostname, s.pid, &json);
                    s.send(&msg)
                }
            };
            match written {
                Ok(()) => failing = false,
                Err(e) => {
                    failures += 1;
                    crate::metrics::audit_sink_dropped();
                    if !failing || failures.is_multiple_of(DROPS_PER_LINE) {
                        tracing::warn!(sink = %name, error = %e, failures, "the audit sink failed to take an entry (the log has it)");
                    }
                    failing = true;
                }
            }
        }
        if let Out::File(w) = &mut out
            && let Err(e) = w.flush()
        {
            tracing::warn!(sink = %name, error = %e, "the audit sink's file could not be written (the log has the entries)");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_are_refused() {
        let syslog = |addr: &str, transport| SinkTarget::Syslog {
            addr: addr.into(),
            transport,
            ca: None,
            identity: None,
        };
        assert_eq!(
            "file:///var/log/a.jsonl".parse::<SinkTarget>().unwrap(),
            SinkTarget::File("/var/log/a.jsonl".into())
        );
        for (url, addr, transport) in [
            ("syslog://siem:1514", "siem:1514", Transport::Udp),
            ("syslog://siem", "siem:514", Transport::Udp),
            ("syslog://[::1]:9", "[::1]:9", Transport::Udp),
            ("syslog+tcp://siem", "siem:601", Transport::Tcp),
            ("syslog+tls://siem.example/", "siem.example:6514", Transport::Tls),
            ("syslog+tls://10.0.0.9:7514", "10.0.0.9:7514", Transport::Tls),
        ] {
            let target = url.parse::<SinkTarget>().unwrap();
            assert_eq!(target, syslog(addr, transport), "{url}");
            assert_eq!(target.to_string().parse::<SinkTarget>().unwrap(), target, "{url} shown as it parses");
        }
        for bad in [
            "file://relative/path",
            "syslog://",
            "http://siem",
            "/var/log/a",
            "syslog://h/x",
            "syslog+udp://h",
            "syslog+tls://",
        ] {
            assert!(bad.parse::<SinkTarget>().is_err(), "{bad}");
        }
        let tls = "syslog+tls://siem".parse::<SinkTarget>().unwrap();
        assert!(
            matches!(AuditSink::start(&tls, None), Err(SinkError::NoCa(_))),
            "TLS without a CA is refused"
        );
        let udp = "syslog://siem".parse::<SinkTarget>().unwrap();
        assert!(matches!(udp.clone().with_ca("/ca.pem".into()), Err(SinkError::CaWithoutTls(_))));
        assert!(matches!(
            udp.with_identity("/c.pem".into(), "/c.key".into()),
            Err(SinkError::CaWithoutTls(_))
        ));
        let missing = tls.with_ca("/nonexistent/ca.pem".into()).unwrap();
        let err = AuditSink::start(&missing, None).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    /// RFC 6587 octet counting over TCP: each message preceded by its length and a space; a
    /// receiver that restarts between entries gets the next batch on a new connection, and the
    /// entries while nobody listens are dropped (the log keeps them), never blocking the sender.
    #[test]
    fn tcp_messages_are_octet_counted_and_a_restarted_receiver_gets_later_ones() {
        use std::io::BufRead;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target: SinkTarget = format!("syslog+tcp://{}", listener.local_addr().unwrap()).parse().unwrap();
        let sink = AuditSink::start(&target, None).unwrap();
        let read_frame = |r: &mut std::io::BufReader<TcpStream>| {
            let mut len = Vec::new();
            r.read_until(b' ', &mut len).unwrap();
            let len: usize = std::str::from_utf8(&len[..len.len() - 1]).unwrap().parse().unwrap();
            let mut msg = vec![0u8; len];
            r.read_exact(&mut msg).unwrap();
            String::from_utf8(msg).unwrap()
        };
        sink.send(1, 1_765_000_000_000, br#"{"seq":1}"#);
        let (conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reader = std::io::BufReader::new(conn);
        let first = read_frame(&mut reader);
        assert!(
            first.starts_with("<110>1 2025-12-06T05:46:40Z ") && first.ends_with(r#"{"seq":1}"#),
            "{first}"
        );
        drop(reader);
        // The receiver went away and came back: later entries arrive on a new connection.
        let mut seq = 2;
        let (conn, _) = loop {
            sink.send(1, 1_765_000_000_000, format!(r#"{{"seq":{seq}}}"#).as_bytes());
            seq += 1;
            listener.set_nonblocking(true).unwrap();
            match listener.accept() {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
            assert!(seq < 100, "the sink never reconnected");
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reader = std::io::BufReader::new(conn);
        let next = read_frame(&mut reader);
        assert!(next.contains(r#"{"seq":"#), "{next}");
    }

    /// A receiver sends nothing in syslog; one that sends more than the sink reads before a
    /// batch (flooding it, or a stream the sink would otherwise drain forever) gets its
    /// connection replaced, and entries keep arriving on the new one.
    #[test]
    fn a_receiver_that_keeps_sending_has_its_connection_replaced() {
        use std::io::BufRead;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target: SinkTarget = format!("syslog+tcp://{}", listener.local_addr().unwrap()).parse().unwrap();
        let sink = AuditSink::start(&target, None).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let conn = conn.unwrap();
                if n == 0 {
                    // The first connection gets 256 KiB back, more than the sink reads at once.
                    let mut flood = conn.try_clone().unwrap();
                    std::thread::spawn(move || flood.write_all(&vec![b'x'; 256 * 1024]));
                }
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut reader = std::io::BufReader::new(conn);
                    loop {
                        let mut len = Vec::new();
                        if reader.read_until(b' ', &mut len).unwrap_or(0) == 0 {
                            return;
                        }
                        let Ok(len) = std::str::from_utf8(&len[..len.len() - 1]).unwrap_or("x").parse()
                        else {
                            return;
                        };
                        let mut msg = vec![0u8; len];
                        if reader.read_exact(&mut msg).is_err() || tx.send((n, msg)).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        for seq in 0.. {
            sink.send(1, 1_765_000_000_000, format!(r#"{{"seq":{seq}}}"#).as_bytes());
            std::thread::sleep(Duration::from_millis(50));
            if rx.try_iter().any(|(n, _)| n > 0) {
                break;
            }
            assert!(Instant::now() < deadline, "the flooding receiver's connection was kept");
        }
    }

    /// With the log's durable mark, an entry reaches the sink only once the log has synced it,
    /// and one the log failed to sync never does.
    #[test]
    fn entries_are_streamed_only_once_the_log_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink.jsonl");
        let (mark, file) = tokio::sync::watch::channel(Ok(3));
        let (stored, store) = tokio::sync::watch::channel(0);
        let sink =
            AuditSink::start(&SinkTarget::File(path.clone()), Some(DurableMark { file, store })).unwrap();
        // Entry 4 was a change: the store's flush after it makes it (and 3) durable.
        stored.send(4).unwrap();
        let read = || std::fs::read_to_string(&path).unwrap_or_default();
        sink.send(4, 0, br#"{"seq":4}"#);
        sink.send(5, 0, br#"{"seq":5}"#);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !read().contains(r#"{"seq":4}"#) {
            assert!(Instant::now() < deadline, "a synced entry is streamed");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(read(), "{\"seq\":4}\n", "entry 5 waits for its sync");
        mark.send(Ok(5)).unwrap();
        while !read().contains(r#"{"seq":5}"#) {
            assert!(Instant::now() < deadline, "entry 5 is streamed once synced");
            std::thread::sleep(Duration::from_millis(10));
        }
        mark.send(Err("disk full".into())).unwrap();
        sink.send(6, 0, br#"{"seq":6}"#);
        sink.send(7, 0, br#"{"seq":7}"#);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(read(), "{\"seq\":4}\n{\"seq\":5}\n", "nothing the log failed to hold");
    }

    #[test]
    fn syslog_messages_are_rfc5424() {
        let msg = rfc5424(1_765_000_000_123, "node-a", 42, br#"{"seq":7}"#);
        let expected = "<110>1 2025-12-06T05:46:40.123Z node-a khlangd 42 audit - \u{feff}{\"seq\":7}";
        assert_eq!(String::from_utf8(msg).unwrap(), expected);
    }
}
