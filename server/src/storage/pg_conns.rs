//! The pool behind a back-off: while the database cannot be reached, requests are refused at
//! once (`Unavailable`) for a delay that doubles from [`BACKOFF_FIRST`] to [`BACKOFF_MAX`], so a
//! node neither stalls its requests on a dead host nor floods the database (or the standby being
//! promoted) with connection attempts; the first request after the delay tries again, and the
//! first success ends the back-off.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool, PoolError};

use super::pool_error;
use crate::StoreError;

pub(super) const BACKOFF_FIRST: Duration = Duration::from_millis(50);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(super) struct Backoff {
    /// Until when requests are refused, and the delay that set it.
    state: Mutex<Option<(Instant, Duration)>>,
}

impl Backoff {
    pub(super) fn shared() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Duration)>> {
        // Every update is one assignment: a panic cannot leave it half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone)]
pub(crate) struct Conns {
    pool: Pool,
    backoff: Arc<Backoff>,
}

impl Conns {
    pub(super) fn new(pool: Pool, backoff: Arc<Backoff>) -> Self {
        Self { pool, backoff }
    }

    pub(crate) async fn get(&self) -> Result<Object, StoreError> {
        if let Some((until, _)) = *self.backoff.lock() {
            let left = until.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                return Err(StoreError::Unavailable(format!(
                    "cannot reach it; trying again in {} ms",
                    left.as_millis()
                )));
            }
        }
        match self.pool.get().await {
            Ok(c) => {
                if self.backoff.lock().take().is_some() {
                    tracing::info!("the database answers again");
                }
                Ok(c)
            }
            Err(e) => {
                // A connection that could not be made backs off; a busy pool does not.
                let unreachable = matches!(
                    &e,
                    PoolError::Backend(_) | PoolError::Timeout(deadpool_postgres::TimeoutType::Create)
                );
                let e = pool_error(e);
                if unreachable && matches!(e, StoreError::Unavailable(_)) {
                    let mut state = self.backoff.lock();
                    let delay = state.map_or(BACKOFF_FIRST, |(_, d)| (d * 2).min(BACKOFF_MAX));
                    if state.is_none() {
                        tracing::warn!(error = %e, "cannot reach the database; backing off and retrying");
                    }
                    *state = Some((Instant::now() + delay, delay));
                }
                Err(e)
            }
        }
    }
}
