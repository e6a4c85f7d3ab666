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

use crate::audit::Rpc;
use crate::policy::Operation;
use crate::storage::{Changes, StoredToken};
use crate::vault::prepare;
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

/// Failed-authentication limits (PCI DSS 8.3.4).
#[derive(Debug, Clone, Copy)]
pub struct AuthLimits {
    /// Failures of one credential within `window` that lock it out; failures of one address
    /// beyond it slow that address's failed answers down (it is throttled, not locked).
    pub max_failures: u32,
    /// Each failure counts for this long, then drops out of the count (failures decay).
    pub window: Duration,
    pub lockout: Duration,
}

impl Default for AuthLimits {
    /// PCI DSS 8.3.4: lock out after at most 10 attempts, for at least 30 minutes.
    fn default() -> Self {
        Self { max_failures: 10, window: Duration::from_secs(15 * 60), lockout: Duration::from_secs(30 * 60) }
    }
}

/// Spacing of a throttled address's failed answers: one per interval, however many it sends at once.
pub const THROTTLE_INTERVAL: Duration = Duration::from_millis(500);
/// A throttled address waiting longer than this for its next failed answer gets
/// `ResourceExhausted` at once (its queue is full); valid credentials are never held back.
pub const MAX_THROTTLE_WAIT: Duration = Duration::from_secs(10);
/// Addresses tracked at once: a spray of addresses cannot grow memory without bound.
const MAX_ADDRESSES: usize = 100_000;
const FAILURE_FORMAT: u8 = 1;

/// A credential whose failures are counted wherever they come from, and which locks out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Credential {
    /// A token, by its id (the public half).
    Token(String),
    /// A custodian's passphrase, by custodian number.
    Custodian(u8),
}

impl Credential {
    /// Its key in the store's lockout records.
    pub fn key(&self) -> Vec<u8> {
        match self {
            Self::Token(id) => [b"t".as_slice(), id.as_bytes()].concat(),
            Self::Custodian(n) => vec![b'c', *n],
        }
    }

    pub fn from_key(key: &[u8]) -> Option<Self> {
        match key.split_first()? {
            (b't', id) => Some(Self::Token(String::from_utf8(id.to_vec()).ok()?)),
            (b'c', [n]) => Some(Self::Custodian(*n)),
            _ => None,
        }
    }
}

pub use crate::storage::FailureRecord;

#[derive(Debug, Default)]
struct AddressFailures {
    failures: std::collections::VecDeque<u64>,
    /// When the next throttled answer may leave (ms).
    next_answer_ms: u64,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Counts failures per credential (locking it) and per address (throttling it).
#[derive(Debug)]
pub(crate) struct AuthGuard {
    limits: AuthLimits,
    addresses: Mutex<HashMap<IpAddr, AddressFailures>>,
    credentials: Mutex<HashMap<Credential, FailureRecord>>,
}

impl AuthGuard {
    pub(crate) fn new(limits: AuthLimits) -> Self {
        Self { limits, addresses: Mutex::new(HashMap::new()), credentials: Mutex::new(HashMap::new()) }
    }

    /// Lockouts kept in the store from before a restart.
    pub(crate) fn restore(&self, records: Vec<(Credential, FailureRecord)>) {
        let mut creds = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        creds.extend(records);
    }

    /// How many credentials are locked out at `now_ms` (metrics).
    pub(crate) fn locked_now(&self, now_ms: u64) -> usize {
        let creds = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        creds.values().filter(|r| r.locked_until_ms.is_some_and(|until| now_ms < until)).count()
    }

    pub(crate) fn credential_locked(&self, c: &Credential, now_ms: u64) -> bool {
        let creds = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        creds.get(c).and_then(|r| r.locked_until_ms).is_some_and(|until| now_ms < until)
    }

    /// Counts one failure of `c`. Returns its record when this failure locked it out: the
    /// lockout is what must survive a restart (stored once per lockout, not once per failure,
    /// so a flood of wrong guesses writes nothing).
    pub(crate) fn credential_failed(&self, c: &Credential, now_ms: u64) -> Option<FailureRecord> {
        let mut creds = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        let r = creds
            .entry(c.clone())
            .or_insert_with(|| FailureRecord { format: FAILURE_FORMAT, ..Default::default() });
        if !self.count(r, now_ms) {
            return None;
        }
        tracing::warn!(target: "khlang::auth", credential = %redacted(c), "too many failures; credential locked out");
        Some(r.clone())
    }

    /// `r` after one more failure at `now_ms` (failures decay, a lockout ends); `true`: this
    /// failure locked it. The same rule applies to a node's own record and to a shared store's.
    fn count(&self, r: &mut FailureRecord, now_ms: u64) -> bool {
        let window = ms(self.limits.window);
        r.failures.retain(|t| now_ms.saturating_sub(*t) < window);
        if r.locked_until_ms.is_some_and(|u| now_ms >= u) {
            r.locked_until_ms = None;
        }
        if r.locked_until_ms.is_some() {
            return false;
        }
        r.failures.push(now_ms);
        if r.failures.len() < self.limits.max_failures as usize {
            return false;
        }
        r.locked_until_ms = Some(now_ms.saturating_add(ms(self.limits.lockout)));
        r.failures.clear();
        true
    }

    /// The stored record `r` after one more failure at `now_ms` (see [`AuthGuard::count`]).
    pub(crate) fn counted(&self, r: Option<FailureRecord>, now_ms: u64) -> FailureRecord {
        let mut r = r.unwrap_or(FailureRecord { format: FAILURE_FORMAT, ..Default::default() });
        self.count(&mut r, now_ms);
        r
    }

    /// Puts a shared store's record of `c` in place of this node's.
    pub(crate) fn set(&self, c: &Credential, record: FailureRecord) {
        self.credentials.lock().unwrap_or_else(|p| p.into_inner()).insert(c.clone(), record);
    }

    /// Counts a failed answer for `ip` and says when it may leave: at once while the address is
    /// within its limit, then one per [`THROTTLE_INTERVAL`]; `None` when its queue is longer than
    /// [`MAX_THROTTLE_WAIT`] (answer `ResourceExhausted` now).
    pub(crate) fn address_failed(&self, ip: IpAddr, now_ms: u64) -> Option<Duration> {
        let mut addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let window = ms(self.limits.window);
        if addresses.len() >= MAX_ADDRESSES && !addresses.contains_key(&ip) {
            addresses.retain(|_, a| a.failures.back().is_some_and(|t| now_ms.saturating_sub(*t) < window));
            if addresses.len() >= MAX_ADDRESSES {
                return None;
            }
        }
        let a = addresses.entry(ip).or_default();
        while a.failures.front().is_some_and(|t| now_ms.saturating_sub(*t) >= window) {
            a.failures.pop_front();
        }
        if a.failures.len() < self.limits.max_failures as usize {
            a.failures.push_back(now_ms);
            return Some(Duration::ZERO);
        }
        let at = a.next_answer_ms.max(now_ms);
        let wait = at - now_ms;
        if wait > ms(MAX_THROTTLE_WAIT) {
            return None;
        }
        a.next_answer_ms = at + ms(THROTTLE_INTERVAL);
        // Keep the count bounded: the newest failures are the ones that decide throttling.
        a.failures.push_back(now_ms);
        if a.failures.len() > self.limits.max_failures as usize * 4 {
            a.failures.pop_front();
        }
        Some(Duration::from_millis(wait))
    }

    /// Whether `ip` is throttled now (its failures within the window reached the limit).
    #[cfg(test)]
    pub(crate) fn address_throttled(&self, ip: IpAddr, now_ms: u64) -> bool {
        let addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let window = ms(self.limits.window);
        addresses.get(&ip).is_some_and(|a| {
            a.failures.iter().filter(|t| now_ms.saturating_sub(**t) < window).count()
                >= self.limits.max_failures as usize
        })
    }
}

/// A credential as logs may show it: the custodian number, or only that it was a token.
fn redacted(c: &Credential) -> String {
    match c {
        Credential::Token(_) => "token".into(),
        Credential::Custodian(n) => format!("custodian {n}"),
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

/// A token's (id, secret hex) if it has the right shape; nothing decoded.
fn split(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if id.len() != ID_BYTES * 2
        || !id.bytes().all(|b| b.is_ascii_hexdigit())
        || secret.len() != SECRET_BYTES * 2
    {
        return None;
    }
    Some((id, secret))
}

/// Splits a token into (id, secret bytes) if it has the right shape.
fn parse(token: &str) -> Option<(&str, Zeroizing<Vec<u8>>)> {
    let (id, secret) = split(token)?;
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
        let mut entry = operator_entry(Rpc::CreateIdentity, Operation::IdentityAdmin, &regs);
        entry.reason = format!("identity '{name}' with role '{role}'");
        let regs = &regs;
        self.audited(entry, prepare!(|_| { self.stage_identity(regs, name, role, "operator").await })).await
    }

    /// Issues another token for an existing, unrevoked identity, on behalf of the local operator.
    pub async fn issue_token(&self, name: &str) -> Result<IssuedToken, VaultError> {
        let regs = self.regulations();
        let mut entry = operator_entry(Rpc::IssueToken, Operation::IdentityAdmin, &regs);
        entry.reason = format!("identity '{name}'");
        self.audited(
            entry,
            prepare!(|_| {
                let identity =
                    self.store.get_identity(name).await?.ok_or(VaultError::NotFound("identity"))?;
                if identity.revoked_ms.is_some() {
                    return Err(VaultError::FailedPrecondition(format!("identity '{name}' is revoked")));
                }
                let mut changes = Changes::new();
                let token = self.stage_token(name, &mut changes)?;
                Ok((token, changes))
            }),
        )
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
            &StoredToken { format: 1, identity: name.to_owned(), mac, created_ms: now_ms(), auth: None },
        );
        let secret_hex = Zeroizing::new(hex::encode(secret.as_slice()));
        Ok(IssuedToken(Zeroizing::new(format!("{PREFIX}{token_id}_{}", secret_hex.as_str()))))
    }

    /// Resolves what the caller presented to an active identity, or `Unauthenticated`. A token
    /// that failed too often is locked out (`LockedOut`) even when right; an address that failed
    /// too often is only slowed down ([`Vault::failure_answer_delay`]), never refused valid credentials.
    pub async fn authenticate(&self, creds: Credentials<'_>) -> Result<Identity, VaultError> {
        let now = now_ms();
        // Only the id, for the lockout: the secret is decoded once, by `verify`.
        let token_id = creds.token.and_then(split).map(|(id, _)| id.to_owned());
        if let Some(id) = &token_id
            && self.auth_guard.credential_locked(&Credential::Token(id.clone()), now)
        {
            return Err(VaultError::LockedOut);
        }
        let result = self.verify(creds).await;
        if let (Some(id), Err(VaultError::Unauthenticated)) = (token_id, &result)
            && self.store.get_token(&id).await.ok().flatten().is_some()
        {
            // A wrong secret for a real token: count it against that token, from any address.
            self.count_failure(&Credential::Token(id), now).await;
        }
        result
    }

    /// How long the answer to a failed authentication from `peer` waits (the address's
    /// throttle), or `ResourceExhausted` when its queue is full. Valid credentials never wait.
    pub fn failure_answer_delay(&self, peer: Option<IpAddr>) -> Result<Duration, VaultError> {
        match peer {
            Some(ip) => self.auth_guard.address_failed(ip, now_ms()).ok_or_else(|| {
                VaultError::LimitExceeded("too many failed attempts from this address; slow down".into())
            }),
            None => Ok(Duration::ZERO),
        }
    }

    /// Counts one failure of `c`; `true`: it is locked out now. Where several nodes share the
    /// store, the count is the store's (one limit for the whole cluster, not one per node);
    /// should the store not answer, this node still counts it.
    pub(crate) async fn count_failure(&self, c: &Credential, now: u64) -> bool {
        let guard = &self.auth_guard;
        match self.store.count_failure(&c.key(), &|r| guard.counted(r, now)).await {
            Ok(Some(record)) => {
                let locked = record.locked_until_ms.is_some_and(|until| now < until);
                if locked {
                    tracing::warn!(target: "khlang::auth", credential = %redacted(c), "too many failures (counted across nodes); credential locked out");
                }
                guard.set(c, record);
                return locked;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(target: "khlang::auth", error = %e, "could not count a failure in the shared store; counted on this node");
            }
        }
        match guard.credential_failed(c, now) {
            Some(record) => {
                self.persist_lockout(c, &record).await;
                true
            }
            None => false,
        }
    }

    /// Follows the lockouts other nodes sharing the store imposed.
    pub(crate) async fn follow_lockouts(&self) -> Result<(), VaultError> {
        let locked = self.store.lockouts(now_ms()).await?;
        self.auth_guard.restore(
            locked
                .into_iter()
                .filter_map(|(k, r)| Some((Credential::from_key(&k)?, r)))
                .filter(|(c, _)| matches!(c, Credential::Token(_)))
                .collect(),
        );
        Ok(())
    }

    /// Stores a lockout, so it survives a restart. Best effort: it holds in memory either way.
    pub(crate) async fn persist_lockout(&self, c: &Credential, record: &FailureRecord) {
        if let Err(e) = self.store.put_failures(&c.key(), record).await {
            tracing::error!(target: "khlang::auth", error = %e, "could not store a lockout record");
        }
    }

    async fn verify(&self, creds: Credentials<'_>) -> Result<Identity, VaultError> {
        let keys = self.unsealed()?;
        let by_token = match creds.token {
            Some(token) => {
                let dummy = [0u8; SECRET_BYTES];
                let parsed = parse(token);
                let stored = match &parsed {
                    Some((id, _)) => self.store.get_token(id).await?,
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
            // The caller holds both, so saying they disagree tells it nothing it does not know.
            (Some(t), Some(c)) if t != c => return Err(VaultError::CredentialsDisagree),
            (Some(t), _) => t,
            (None, Some(c)) => c.to_owned(),
            (None, None) => return Err(VaultError::Unauthenticated),
        };
        match self.store.get_identity(&name).await? {
            Some(identity) if identity.revoked_ms.is_none() => {
                Ok(Identity { name: identity.name, role: identity.role })
            }
            _ => Err(VaultError::Unauthenticated),
        }
    }

    /// Whether a token is currently valid (used to reuse development credentials across restarts).
    pub async fn token_is_valid(&self, token: &str) -> bool {
        self.verify(Credentials { token: Some(token), certificate_name: None, peer: None }).await.is_ok()
    }

    /// Whether identity `name` exists and was revoked (the operator's view, unaudited).
    pub async fn identity_is_revoked(&self, name: &str) -> Result<bool, VaultError> {
        Ok(self.store.get_identity(name).await?.is_some_and(|i| i.revoked_ms.is_some()))
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

    fn guard(max: u32) -> AuthGuard {
        AuthGuard::new(AuthLimits {
            max_failures: max,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(120),
        })
    }

    #[test]
    fn a_credential_locks_after_the_limit_and_failures_decay() {
        let g = guard(3);
        let (c1, c2) = (Credential::Token("cd".into()), Credential::Token("ab".into()));
        assert!(g.credential_failed(&c1, 0).is_none());
        assert!(g.credential_failed(&c1, 30_000).is_none());
        assert!(!g.credential_locked(&c1, 30_000));
        // The first failure has decayed by 61 s: three within the window are needed.
        assert!(g.credential_failed(&c1, 61_000).is_none());
        assert!(!g.credential_locked(&c1, 61_000));
        let r = g.credential_failed(&c1, 62_000).expect("locked now: stored");
        assert!(g.credential_locked(&c1, 62_000));
        assert_eq!(r.locked_until_ms, Some(182_000));
        assert!(g.credential_failed(&c1, 63_000).is_none(), "stored once per lockout");
        assert!(!g.credential_locked(&c2, 62_000), "only that credential");
        assert!(!g.credential_locked(&c1, 182_000), "the lockout ends");
    }

    #[test]
    fn a_restored_lockout_holds() {
        let g = guard(3);
        let c = Credential::Custodian(2);
        let record = FailureRecord { format: 1, locked_until_ms: Some(10_000), ..Default::default() };
        assert_eq!(Credential::from_key(&c.key()), Some(c.clone()));
        let t = Credential::Token("ff".into());
        assert_eq!(Credential::from_key(&t.key()), Some(t));
        g.restore(vec![(c.clone(), record)]);
        assert!(g.credential_locked(&c, 9_999));
    }

    #[test]
    fn an_address_is_throttled_not_locked() {
        let g = guard(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(g.address_failed(ip, 0), Some(Duration::ZERO));
        assert_eq!(g.address_failed(ip, 0), Some(Duration::ZERO));
        assert!(g.address_throttled(ip, 0));
        // Beyond the limit, answers leave one per interval, however many arrive at once.
        assert_eq!(g.address_failed(ip, 0), Some(Duration::ZERO));
        assert_eq!(g.address_failed(ip, 0), Some(THROTTLE_INTERVAL));
        assert_eq!(g.address_failed(ip, 0), Some(THROTTLE_INTERVAL * 2));
        let queued = (0..100).filter_map(|_| g.address_failed(ip, 0)).count();
        assert!(queued <= (MAX_THROTTLE_WAIT.as_millis() / THROTTLE_INTERVAL.as_millis()) as usize);
        assert_eq!(g.address_failed(ip, 0), None, "queue full");
        assert!(!g.address_throttled("10.0.0.2".parse().unwrap(), 0));
        assert!(!g.address_throttled(ip, 10 * 60_000), "failures decay");
    }
}
