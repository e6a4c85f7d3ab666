//! Unauthenticated events that repeat — `SealStatus` calls, failed authentications, custodian
//! calls refused for load — would otherwise each write and sync an entry (~4,000 a second from
//! one client). Within an interval, the first of its kind from an address is written at once and
//! the identical ones after it are counted; when the interval ends one summary entry carries the
//! count (`repeated`). A different address, RPC, outcome or reason is a different kind: every
//! distinct event is on record, the disk grows by at most two entries per kind and interval.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::audit::AuditEntry;

/// How long identical events from one address are counted before their summary is written.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Kinds counted at once; beyond, further addresses share one kind (`peer` = "(many)").
const MAX_KINDS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Kind {
    address: String,
    rpc: String,
    identity: String,
    outcome: crate::Outcome,
    reason: String,
}

#[derive(Debug)]
struct Counting {
    since_ms: u64,
    last_ms: u64,
    count: u64,
    first: AuditEntry,
}

/// What to do with an event.
#[derive(Debug)]
pub(crate) enum Admit {
    /// Write it: it is the first of its kind in its interval.
    Write,
    /// Counted into its kind's summary.
    Counted,
}

#[derive(Debug)]
pub(crate) struct Repeats {
    interval_ms: u64,
    kinds: Mutex<HashMap<Kind, Counting>>,
}

fn address(peer: &str) -> String {
    peer.parse::<SocketAddr>().map(|a| a.ip().to_string()).unwrap_or_else(|_| peer.to_owned())
}

impl Repeats {
    pub(crate) fn new(interval: Duration) -> Self {
        Self { interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX), kinds: Mutex::default() }
    }

    /// Admits one event at `now_ms`; also returns the summaries of intervals that have ended
    /// (written before the event; the log stamps each entry's time as it appends it).
    pub(crate) fn admit(&self, entry: &AuditEntry, now_ms: u64) -> (Admit, Vec<AuditEntry>) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let ended = Self::take_ended(&mut kinds, now_ms, self.interval_ms);
        let mut kind = Kind {
            address: address(&entry.peer),
            rpc: entry.rpc.clone(),
            identity: entry.identity.clone(),
            outcome: entry.outcome,
            reason: entry.reason.clone(),
        };
        if kinds.len() >= MAX_KINDS && !kinds.contains_key(&kind) {
            kind.address = "(many)".into();
        }
        if let Some(c) = kinds.get_mut(&kind) {
            c.count += 1;
            c.last_ms = now_ms;
            return (Admit::Counted, ended);
        }
        kinds.insert(kind, Counting { since_ms: now_ms, last_ms: now_ms, count: 0, first: entry.clone() });
        (Admit::Write, ended)
    }

    /// Summaries of every interval that has ended by `now_ms`.
    pub(crate) fn ended(&self, now_ms: u64) -> Vec<AuditEntry> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        Self::take_ended(&mut kinds, now_ms, self.interval_ms)
    }

    /// Whether any kind is counting (nothing to summarise otherwise).
    pub(crate) fn is_empty(&self) -> bool {
        self.kinds.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Every summary still counting (at shutdown).
    pub(crate) fn all(&self) -> Vec<AuditEntry> {
        self.ended(u64::MAX)
    }

    fn take_ended(kinds: &mut HashMap<Kind, Counting>, now_ms: u64, interval_ms: u64) -> Vec<AuditEntry> {
        let mut out = Vec::new();
        kinds.retain(|kind, c| {
            if now_ms.saturating_sub(c.since_ms) < interval_ms {
                return true;
            }
            if c.count > 0 {
                out.push(summary(kind, c));
            }
            false
        });
        out
    }
}

fn summary(kind: &Kind, c: &Counting) -> AuditEntry {
    AuditEntry {
        peer: kind.address.clone(),
        request_id: String::new(),
        client_request_id: String::new(),
        repeated: c.count,
        reason: format!(
            "{} more like this from {} between {} and {} ms: {}",
            c.count, kind.address, c.since_ms, c.last_ms, c.first.reason
        ),
        time_ms: c.last_ms,
        ..c.first.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(peer: &str, rpc: &str) -> AuditEntry {
        AuditEntry {
            peer: peer.into(),
            rpc: rpc.into(),
            outcome: crate::Outcome::Ok,
            ..AuditEntry::default()
        }
    }

    #[test]
    fn the_first_is_written_the_rest_counted_then_summarised() {
        let r = Repeats::new(Duration::from_secs(10));
        assert!(matches!(r.admit(&event("10.0.0.1:1000", "SealStatus"), 0).0, Admit::Write));
        for t in 1..=99 {
            assert!(matches!(r.admit(&event("10.0.0.1:2000", "SealStatus"), t).0, Admit::Counted));
        }
        // Another address or RPC is another kind.
        assert!(matches!(r.admit(&event("10.0.0.2:1000", "SealStatus"), 5).0, Admit::Write));
        assert!(matches!(r.admit(&event("10.0.0.1:1000", "Unseal"), 5).0, Admit::Write));
        assert!(r.ended(9_999).is_empty());
        let (admit, ended) = r.admit(&event("10.0.0.1:3000", "SealStatus"), 10_000);
        assert!(matches!(admit, Admit::Write), "a new interval starts with a written entry");
        assert_eq!(ended.len(), 1, "kinds that repeated get a summary; the others end silently");
        assert_eq!((ended[0].repeated, ended[0].peer.as_str(), ended[0].time_ms), (99, "10.0.0.1", 99));
        assert!(ended[0].reason.starts_with("99 more like this from 10.0.0.1"));
        assert!(r.all().is_empty(), "nothing counted in the new interval yet");
    }
}
