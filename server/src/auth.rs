//! Identities and authentication.
//!
//! Bearer tokens look like `khl_<token id: 16 hex>_<secret: 64 hex>`. The vault stores, per token id,
//! the identity's name and an HMAC of the secret under a pepper derived from the derivation key — never the
//! token. A client certificate verified against the configured CA names its identity in its subject
//! common name. Verification does the same work whatever failed, and failures are rate-limited per
//! peer address (PCI DSS 8.3.4).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use khlang_keys::RandomSource;
use zeroize::Zeroizing;

use crate::policy::Operation;
use crate::store::{Changes, StoredToken};
use crate::vault::{now_ms, operator_entry};
use crate::{Identity, Vault, VaultError};

const PREFIX: &str = "khl_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// A freshly issued token: shown to its holder once, wiped on drop, never printed by `Debug`.
pub struct IssuedToken(Zeroizing<String>);

impl IssuedToken {
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IssuedToken(..)")
    }
}

/// What a caller presented.
#[derive(Clone, Copy)]
pub struct Credentials<'a> {
    pub token: Option<&'a str>,
    /// The subject common name of a client certificate the TLS layer verified against the CA.
    pub certificate_name: Option<&'a str>,
    pub peer: Option<IpAddr>,
}

impl fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &self.token.map(|_| ".."))
            .field("certificate_name", &self.certificate_name)
            .field("peer", &self.peer)
            .finish()
    }
}

/// Failed-authentication limits per peer address.
#[derive(Debug, Clone, Copy)]
pub struct AuthLimits {
    /// Failures allowed within `window` before the address is locked out.
    pub max_failures: u32,
    pub window: Duration,
    pub lockout: Duration,
}

impl Default for AuthLimits {
    /// PCI DSS 8.3.4: lock out after at most 10 attempts, for at least 30 minutes.
    fn default() -> Self {
        Self { max_failures: 10, window: Duration::from_secs(15 * 60), lockout: Duration::from_secs(30 * 60) }
    }
}

#[derive(Debug)]
struct PeerFailures {
    count: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
}

/// Counts failures per address; locks an address out once it exceeds the limit.
#[derive(Debug)]
pub(crate) struct AuthGuard {
    limits: AuthLimits,
    peers: Mutex<HashMap<IpAddr, PeerFailures>>,
}

impl AuthGuard {
    pub(crate) fn new(limits: AuthLimits) -> Self {
        Self { limits, peers: Mutex::new(HashMap::new()) }
    }

    pub(crate) fn locked(&self, ip: IpAddr, now: Instant) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(&ip).and_then(|p| p.locked_until).is_some_and(|until| now < until)
    }

    pub(crate) fn failed(&self, ip: IpAddr, now: Instant) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers.len() > 100_000 {
            // Bounded memory under a spray of addresses: forget entries that no longer matter.
            peers.retain(|_, p| {
                p.locked_until.is_some_and(|u| now < u) || now - p.window_start < self.limits.window
            });
        }
        let p = peers.entry(ip).or_insert(PeerFailures { count: 0, window_start: now, locked_until: None });
        if now - p.window_start >= self.limits.window {
            p.count = 0;
            p.window_start = now;
        }
        p.count += 1;
        if p.count >= self.limits.max_failures {
            p.locked_until = Some(now + self.limits.lockout);
            tracing::warn!(target: "khlang::auth", peer = %ip, "too many failed authentications; address locked out");
        }
    }

    /// Takes back one failure counted ahead of a check that then succeeded (passphrases are
    /// counted before their slow derivation). A success never clears the other failures: nine
    /// guesses and one valid call must not start the count again.
    pub(crate) fn forgive_one(&self, ip: IpAddr) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = peers.get_mut(&ip)
            && p.locked_until.is_none()
        {
            p.count = p.count.saturating_sub(1);
        }
    }
}

/// Passphrase checks run Argon2id (64 MiB each by default) before anything else can refuse them,
/// and they need no credential: at most this many run at once (measured: 32 unbounded at once
/// took the server from 115 MiB to 2.1 GiB).
pub(crate) const MAX_DERIVATIONS: usize = 2;
/// How long a passphrase check waits for a free slot before it is refused.
const DERIVATION_WAIT: Duration = Duration::from_millis(500);

/// Bounds concurrent key derivations.
#[derive(Default)]
pub(crate) struct DerivationGate {
    in_use: Mutex<usize>,
    freed: std::sync::Condvar,
    /// The most that ever ran at once (tests check the bound holds).
    peak: std::sync::atomic::AtomicUsize,
}

/// A slot in the gate, given back on drop.
pub(crate) struct DerivationSlot<'a>(&'a DerivationGate);

impl Drop for DerivationSlot<'_> {
    fn drop(&mut self) {
        *self.0.in_use.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

impl DerivationGate {
    /// A slot, or `ResourceExhausted` once the wait is over.
    pub(crate) fn enter(&self) -> Result<DerivationSlot<'_>, VaultError> {
        let deadline = Instant::now() + DERIVATION_WAIT;
        let mut in_use = self.in_use.lock().unwrap_or_else(|p| p.into_inner());
        while *in_use >= MAX_DERIVATIONS {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(VaultError::LimitExceeded(
                    "too many passphrase checks at once; try again in a moment".into(),
                ));
            }
            in_use = self.freed.wait_timeout(in_use, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        *in_use += 1;
        self.peak.fetch_max(*in_use, std::sync::atomic::Ordering::Relaxed);
        Ok(DerivationSlot(self))
    }

    pub(crate) fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Splits a token into (id, secret bytes) if it has the right shape.
fn parse(token: &str) -> Option<(&str, Zeroizing<Vec<u8>>)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if id.len() != ID_BYTES * 2
        || !id.bytes().all(|b| b.is_ascii_hexdigit())
        || secret.len() != SECRET_BYTES * 2
    {
        return None;
    }
    Some((id, Zeroizing::new(hex::decode(secret).ok()?)))
}

pub(crate) fn check_identity_name(name: &str) -> Result<(), VaultError> {
    if name.is_empty()
        || name.len() > 128
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(VaultError::InvalidArgument(
            "identity names are 1–128 characters of letters, digits and - _ . @".into(),
        ));
    }
    Ok(())
}

impl Vault {
    /// Creates an identity and its first token on behalf of the local operator (`khlangd init`,
    /// `khlangd dev`, test harnesses): no API caller, audited as `operator`.
    pub async fn bootstrap_identity(&self, name: &str, role: &str) -> Result<IssuedToken, VaultError> {
        let regs = self.regulations();
        let mut entry = operator_entry("CreateIdentity", Operation::IdentityAdmin, &regs);
        entry.reason = format!("identity '{name}' with role '{role}'");
        self.audited(entry, |_| self.stage_identity(&regs, name, role, "operator")).await
    }

    /// Issues another token for an existing, unrevoked identity, on behalf of the local operator.
    pub async fn issue_token(&self, name: &str) -> Result<IssuedToken, VaultError> {
        let regs = self.regulations();
        let mut entry = operator_entry("IssueToken", Operation::IdentityAdmin, &regs);
        entry.reason = format!("identity '{name}'");
        self.audited(entry, |_| {
            let identity = self.store.get_identity(name)?.ok_or(VaultError::NotFound("identity"))?;
            if identity.revoked_ms.is_some() {
                return Err(VaultError::FailedPrecondition(format!("identity '{name}' is revoked")));
            }
            let mut changes = Changes::new();
            let token = self.stage_token(name, &mut changes)?;
            Ok((token, changes))
        })
        .await
    }

    /// A new random token for `name`, staged (only its MAC) into `changes`.
    pub(crate) fn stage_token(&self, name: &str, changes: &mut Changes) -> Result<IssuedToken, VaultError> {
        let keys = self.unsealed()?;
        let mut id = [0u8; ID_BYTES];
        self.rng.fill(&mut id)?;
        let mut secret = Zeroizing::new([0u8; SECRET_BYTES]);
        self.rng.fill(secret.as_mut_slice())?;
        let token_id = hex::encode(id);
        let mac = keys.token_pepper.mac(secret.as_slice());
        changes.put_token(
            &token_id,
            &StoredToken { format: 1, identity: name.to_owned(), mac, created_ms: now_ms() },
        )?;
        let secret_hex = Zeroizing::new(hex::encode(secret.as_slice()));
        Ok(IssuedToken(Zeroizing::new(format!("{PREFIX}{token_id}_{}", secret_hex.as_str()))))
    }

    /// Resolves what the caller presented to an active identity, or `Unauthenticated`.
    pub fn authenticate(&self, creds: Credentials<'_>) -> Result<Identity, VaultError> {
        let now = Instant::now();
        if let Some(ip) = creds.peer
            && self.auth_guard.locked(ip, now)
        {
            return Err(VaultError::LockedOut);
        }
        let result = self.verify(creds);
        // A success clears nothing: failures decay with their window only.
        if let (Some(ip), Err(VaultError::Unauthenticated)) = (creds.peer, &result) {
            self.auth_guard.failed(ip, now);
        }
        result
    }

    fn verify(&self, creds: Credentials<'_>) -> Result<Identity, VaultError> {
        let keys = self.unsealed()?;
        let by_token = match creds.token {
            Some(token) => {
                let dummy = [0u8; SECRET_BYTES];
                let parsed = parse(token);
                let stored = match &parsed {
                    Some((id, _)) => self.store.get_token(id)?,
                    None => None,
                };
                let secret: &[u8] = parsed.as_ref().map_or(&dummy[..], |(_, s)| s.as_slice());
                let expected = stored.as_ref().map_or([0xFFu8; 32], |s| s.mac);
                // Always one MAC and one constant-time compare, so timing does not tell which part failed.
                let ok = keys.token_pepper.verify(secret, &expected);
                match stored {
                    Some(t) if ok && parsed.is_some() => Some(t.identity),
                    _ => return Err(VaultError::Unauthenticated),
                }
            }
            None => None,
        };
        let name = match (by_token, creds.certificate_name) {
            (Some(t), Some(c)) if t != c => return Err(VaultError::Unauthenticated),
            (Some(t), _) => t,
            (None, Some(c)) => c.to_owned(),
            (None, None) => return Err(VaultError::Unauthenticated),
        };
        match self.store.get_identity(&name)? {
            Some(identity) if identity.revoked_ms.is_none() => {
                Ok(Identity { name: identity.name, role: identity.role })
            }
            _ => Err(VaultError::Unauthenticated),
        }
    }

    /// Whether a token is currently valid (used to reuse development credentials across restarts).
    pub fn token_is_valid(&self, token: &str) -> bool {
        self.verify(Credentials { token: Some(token), certificate_name: None, peer: None }).is_ok()
    }

    /// Whether identity `name` exists and was revoked (the operator's view, unaudited).
    pub fn identity_is_revoked(&self, name: &str) -> Result<bool, VaultError> {
        Ok(self.store.get_identity(name)?.is_some_and(|i| i.revoked_ms.is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_only_the_exact_shape() {
        let good = format!("khl_{}_{}", "0".repeat(16), "ab".repeat(32));
        assert!(parse(&good).is_some());
        assert!(parse("").is_none());
        assert!(parse("khl_").is_none());
        assert!(parse(&good.replace("khl_", "khx_")).is_none());
        assert!(parse(&format!("khl_{}_{}", "0".repeat(15), "ab".repeat(32))).is_none());
        assert!(parse(&format!("khl_{}_{}", "0".repeat(16), "zz".repeat(32))).is_none());
        assert!(parse(&format!("{good}00")).is_none());
    }

    #[test]
    fn guard_locks_out_after_the_limit_and_only_that_address() {
        let guard = AuthGuard::new(AuthLimits {
            max_failures: 3,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(60),
        });
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let now = Instant::now();
        guard.failed(a, now);
        guard.failed(a, now);
        assert!(!guard.locked(a, now));
        guard.failed(a, now);
        assert!(guard.locked(a, now));
        assert!(!guard.locked(b, now));
        assert!(!guard.locked(a, now + Duration::from_secs(61)), "lockout ends");
    }
}
