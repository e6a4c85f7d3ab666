//! Streaming audit entries to a SIEM: each entry, as its canonical JSON (no value, no subject id —
//! only what the log itself holds), also goes to a file as JSON Lines or to a syslog receiver as
//! RFC 5424 over UDP. Best-effort and never a substitute for the log: a request never waits for
//! it (a bounded queue; what does not fit is counted, logged and dropped), a receiver that is away
//! loses entries, and the log's own files and proofs are what an officer verifies.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

/// Entries waiting for the sink's thread before new ones are dropped.
const QUEUE: usize = 16 * 1024;
/// RFC 5424 PRI: facility 13 (log audit) × 8 + severity 6 (informational).
const SYSLOG_PRI: u8 = 13 * 8 + 6;
/// RFC 5424's APP-NAME and MSGID for these messages.
const APP_NAME: &str = "khlangd";
const MSG_ID: &str = "audit";
/// After this many drops in a row, one more line says how many were dropped.
const DROPS_PER_LINE: u64 = 1000;

/// Where entries are streamed: `file:///absolute/path` (JSON Lines, appended) or
/// `syslog://host:port` (RFC 5424 over UDP; port 514 when left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkTarget {
    File(PathBuf),
    Syslog(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("an audit sink is file:///absolute/path or syslog://host[:port], not '{0}'")]
    Unknown(String),
    #[error("cannot open the audit sink {0}: {1}")]
    Open(String, std::io::Error),
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
        if let Some(host) = s.strip_prefix("syslog://") {
            let host = host.trim_end_matches('/');
            if host.is_empty() || host.contains('/') {
                return Err(SinkError::Unknown(s.to_owned()));
            }
            let with_port = if host.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
                host.to_owned()
            } else {
                format!("{host}:514")
            };
            return Ok(Self::Syslog(with_port));
        }
        Err(SinkError::Unknown(s.to_owned()))
    }
}

impl std::fmt::Display for SinkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "file://{}", p.display()),
            Self::Syslog(a) => write!(f, "syslog://{a}"),
        }
    }
}

/// The sending end: [`AuditSink::send`] never blocks.
pub struct AuditSink {
    tx: SyncSender<(u64, Vec<u8>)>,
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
}

impl AuditSink {
    /// Opens the target (a file is created 0600 if missing; a syslog host must resolve) and
    /// starts the thread that writes to it.
    pub fn start(target: &SinkTarget) -> Result<Self, SinkError> {
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
            SinkTarget::Syslog(addr) => {
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
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let name = target.to_string();
        std::thread::Builder::new()
            .name("khlang-audit-sink".into())
            .spawn(move || write_all(rx, out, &name))
            .map_err(open_error)?;
        Ok(Self { tx, dropped: Arc::default() })
    }

    /// Queues entry `json` (its canonical JSON) written at `time_ms`; drops it when the queue is
    /// full (the sink is slower than the vault, or away).
    pub fn send(&self, time_ms: u64, json: &[u8]) {
        match self.tx.try_send((time_ms, json.to_vec())) {
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

fn write_all(rx: Receiver<(u64, Vec<u8>)>, mut out: Out, name: &str) {
    let mut failures = 0u64;
    while let Ok(first) = rx.recv() {
        // Everything waiting now, then one flush: the file is never far behind.
        for (time_ms, json) in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            let written = match &mut out {
                Out::File(w) => w.write_all(&json).and_then(|_| w.write_all(b"\n")),
                Out::Syslog { socket, hostname, pid } => {
                    socket.send(&rfc5424(time_ms, hostname, *pid, &json)).map(|_| ())
                }
            };
            if let Err(e) = written {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(DROPS_PER_LINE) {
                    tracing::warn!(sink = %name, error = %e, failures, "the audit sink failed to take an entry (the log has it)");
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
        assert_eq!(
            "file:///var/log/a.jsonl".parse::<SinkTarget>().unwrap(),
            SinkTarget::File("/var/log/a.jsonl".into())
        );
        assert_eq!(
            "syslog://siem:1514".parse::<SinkTarget>().unwrap(),
            SinkTarget::Syslog("siem:1514".into())
        );
        assert_eq!("syslog://siem".parse::<SinkTarget>().unwrap(), SinkTarget::Syslog("siem:514".into()));
        assert_eq!("syslog://[::1]:9".parse::<SinkTarget>().unwrap(), SinkTarget::Syslog("[::1]:9".into()));
        for bad in ["file://relative/path", "syslog://", "http://siem", "/var/log/a", "syslog://h/x"] {
            assert!(bad.parse::<SinkTarget>().is_err(), "{bad}");
        }
    }

    #[test]
    fn syslog_messages_are_rfc5424() {
        let msg = rfc5424(1_765_000_000_123, "node-a", 42, br#"{"seq":7}"#);
        let expected = "<110>1 2025-12-06T05:46:40.123Z node-a khlangd 42 audit - \u{feff}{\"seq\":7}";
        assert_eq!(String::from_utf8(msg).unwrap(), expected);
    }
}
