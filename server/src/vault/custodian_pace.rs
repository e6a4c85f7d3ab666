//! Custodians' passphrases are tried without a credential (that is what unsealing is), so a
//! lockout of a custodian after wrong tries would let anyone who reaches the port keep the vault
//! sealed, and, stored, keep it from starting. Wrong tries are paced instead, per address: once
//! one address has tried a custodian wrongly `max_failures` times within the window, its tries of
//! that custodian are admitted one per [`CUSTODIAN_PACE`], each waiting its turn (before any key
//! derivation) up to [`CUSTODIAN_WAIT`], past which it is refused (`ResourceExhausted`). Another
//! address, and so the real custodian, is not held back; the operator's passphrase files at start
//! are not paced at all. Guessing from many addresses at once is bounded by the derivation gate
//! (`MAX_DERIVATIONS` Argon2id runs at a time).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use super::auth::AuthLimits;

/// One paced try of a custodian per address per this long.
pub const CUSTODIAN_PACE: Duration = Duration::from_secs(1);
/// The longest a paced try waits for its turn.
pub const CUSTODIAN_WAIT: Duration = Duration::from_secs(5);
/// Paced tries waiting for their turn at once, over all addresses: each waits on a thread of the
/// blocking pool (a custodian's call runs there), so many addresses together cannot hold it.
/// Past it a paced try is refused at once; an unpaced one (the real custodian) never waits.
pub const MAX_WAITING: usize = 32;
/// Addresses tracked at once (then those with no failure in the window are forgotten, and if all
/// have one, a new address is paced as if it had failed: a spray of addresses cannot grow memory).
const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Default)]
struct Tries {
    failures: VecDeque<u64>,
    /// When the next paced try may start (ms).
    next_ms: u64,
}

#[derive(Debug)]
pub(crate) struct CustodianPace {
    max_failures: usize,
    window_ms: u64,
    tries: Mutex<HashMap<(u8, IpAddr), Tries>>,
    waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// A paced try's place among those waiting (see [`MAX_WAITING`]), given back when dropped.
#[derive(Debug)]
pub(crate) struct Waiting(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl CustodianPace {
    pub(crate) fn new(limits: &AuthLimits) -> Self {
        Self {
            max_failures: limits.max_failures.max(1) as usize,
            window_ms: ms(limits.window),
            tries: Mutex::new(HashMap::new()),
            waiting: std::sync::Arc::default(),
        }
    }

    /// How long a try of `custodian` from `ip` at `now_ms` waits for its turn; `None`: refuse it
    /// now (its address's queue is full).
    pub(crate) fn admit(&self, custodian: u8, ip: IpAddr, now_ms: u64) -> Option<Duration> {
        let mut tries = self.tries.lock().unwrap_or_else(|p| p.into_inner());
        if tries.len() >= MAX_TRACKED && !tries.contains_key(&(custodian, ip)) {
            let window = self.window_ms;
            tries.retain(|_, t| t.failures.back().is_some_and(|f| now_ms.saturating_sub(*f) < window));
        }
        let crowded = tries.len() >= MAX_TRACKED && !tries.contains_key(&(custodian, ip));
        let max = self.max_failures;
        let t = tries.entry((custodian, ip)).or_default();
        while t.failures.front().is_some_and(|f| now_ms.saturating_sub(*f) >= self.window_ms) {
            t.failures.pop_front();
        }
        if t.failures.len() < max && !crowded {
            return Some(Duration::ZERO);
        }
        let at = t.next_ms.max(now_ms);
        let wait = at - now_ms;
        if wait > ms(CUSTODIAN_WAIT) {
            return None;
        }
        t.next_ms = at + ms(CUSTODIAN_PACE);
        Some(Duration::from_millis(wait))
    }

    /// A place to wait in, or `None` when [`MAX_WAITING`] tries already wait.
    pub(crate) fn wait_slot(&self) -> Option<Waiting> {
        use std::sync::atomic::Ordering::SeqCst;
        self.waiting.fetch_update(SeqCst, SeqCst, |n| (n < MAX_WAITING).then_some(n + 1)).ok()?;
        Some(Waiting(self.waiting.clone()))
    }

    /// A try of `custodian` from `ip` was wrong.
    pub(crate) fn failed(&self, custodian: u8, ip: IpAddr, now_ms: u64) {
        let mut tries = self.tries.lock().unwrap_or_else(|p| p.into_inner());
        let t = tries.entry((custodian, ip)).or_default();
        t.failures.push_back(now_ms);
        // The newest failures decide pacing: the count stays bounded.
        if t.failures.len() > self.max_failures * 4 {
            t.failures.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(max: u32) -> CustodianPace {
        CustodianPace::new(&AuthLimits {
            max_failures: max,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(1800),
        })
    }

    #[test]
    fn wrong_tries_from_one_address_are_paced_and_others_are_not() {
        let p = pace(3);
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for i in 0..3 {
            assert_eq!(p.admit(1, a, 1_000 + i), Some(Duration::ZERO));
            p.failed(1, a, 1_000 + i);
        }
        // Paced: one a second, queued up to CUSTODIAN_WAIT, then refused.
        let waits: Vec<_> = (0..8).map(|_| p.admit(1, a, 2_000)).collect();
        assert_eq!(waits[0], Some(Duration::ZERO));
        assert_eq!(waits[1], Some(CUSTODIAN_PACE));
        assert_eq!(waits[5], Some(CUSTODIAN_WAIT));
        assert_eq!(waits[6], None);
        // Another address, and another custodian from the same one, go at once.
        assert_eq!(p.admit(1, b, 2_000), Some(Duration::ZERO));
        assert_eq!(p.admit(2, a, 2_000), Some(Duration::ZERO));
        // Failures age out of the window: the address goes at once again.
        assert_eq!(p.admit(1, a, 200_000), Some(Duration::ZERO));
    }

    #[test]
    fn only_so_many_paced_tries_wait_at_once() {
        let p = pace(3);
        let held: Vec<_> = (0..MAX_WAITING).map(|_| p.wait_slot().expect("a place")).collect();
        assert!(p.wait_slot().is_none(), "full");
        drop(held);
        assert!(p.wait_slot().is_some(), "given back");
    }
}
