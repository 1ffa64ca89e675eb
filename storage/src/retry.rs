//! Retries with exponential back-off, for transient failures only.

use std::future::Future;
use std::time::Duration;

/// `attempts` tries in all (at least 1), waiting `base_delay · 2^k` (at most `max_delay`) after
/// the k-th failure. object_store's HTTP client retries a failed request itself first (about ten
/// times within three minutes); this covers what outlasts that, such as a server restarting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { attempts: 8, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(10) }
    }
}

impl RetryConfig {
    /// One attempt, no retries.
    pub fn none() -> Self {
        Self { attempts: 1, ..Self::default() }
    }

    /// The wait after failed attempt `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// Why one storage operation failed: the object store's error, or the local file system's.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Store(#[from] object_store::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The task running a local file operation ended without finishing it (it was cancelled).
    #[error("the local file operation was cancelled")]
    Cancelled,
}

impl Failure {
    pub fn is_not_found(&self) -> bool {
        match self {
            Failure::Store(e) => matches!(e, object_store::Error::NotFound { .. }),
            Failure::Io(e) => e.kind() == std::io::ErrorKind::NotFound,
            Failure::Cancelled => false,
        }
    }

    /// Whether trying again may help: network and server errors may; a missing object, a refused
    /// permission, a failed precondition, a bad path or a cancelled task will not.
    pub fn is_transient(&self) -> bool {
        use object_store::Error as E;
        use std::io::ErrorKind as K;
        match self {
            Failure::Store(e) => !matches!(
                e,
                E::NotFound { .. }
                    | E::InvalidPath { .. }
                    | E::JoinError { .. }
                    | E::NotSupported { .. }
                    | E::AlreadyExists { .. }
                    | E::Precondition { .. }
                    | E::NotModified { .. }
                    | E::NotImplemented { .. }
                    | E::PermissionDenied { .. }
                    | E::Unauthenticated { .. }
                    | E::UnknownConfigurationKey { .. }
            ),
            // A local disk that fails (full, I/O error, file too short) fails again; only
            // interruptions and network file systems' time-outs are worth another try.
            Failure::Io(e) => matches!(
                e.kind(),
                K::Interrupted
                    | K::TimedOut
                    | K::WouldBlock
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::ConnectionRefused
            ),
            Failure::Cancelled => false,
        }
    }
}

/// Whether `err` (anywhere in its chain) says that an object does not exist.
pub fn is_not_found(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.downcast_ref::<Failure>().is_some_and(Failure::is_not_found))
}

/// Runs `op` until it succeeds, fails with a permanent error, or has failed `config.attempts`
/// times; `what` names the object in the warnings logged before each retry.
pub async fn retry<T, F, Fut>(config: &RetryConfig, what: &str, mut op: F) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < config.attempts && e.is_transient() => {
                let delay = config.delay(attempt);
                tracing::warn!(object = what, attempt, error = %e, "storage operation failed, retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
