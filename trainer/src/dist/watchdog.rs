//! The watchdog of the collectives: a rank whose collective has not completed within
//! `dist.timeout_s` (a peer died or stopped) prints which one and exits, so no rank of a broken
//! job hangs forever whatever its launcher does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The exit status of a process whose collective timed out (EX_TEMPFAIL: a requeue may help).
pub const TIMEOUT_EXIT_CODE: i32 = 75;

/// Aborts the process when a collective takes longer than the timeout (see the module docs).
pub(crate) struct Watchdog {
    shared: Arc<WatchState>,
    thread: Option<JoinHandle<()>>,
}

struct WatchState {
    epoch: Instant,
    /// Milliseconds since `epoch` at which the running collective started, plus one; 0 = none.
    started: AtomicU64,
    /// Collectives entered so far: identifies the one that hung in the error message.
    count: AtomicU64,
    op: Mutex<&'static str>,
    stop: AtomicBool,
}

pub(crate) struct WatchGuard<'a>(&'a WatchState);

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        self.0.started.store(0, Ordering::SeqCst);
    }
}

impl Watchdog {
    pub(crate) fn start(rank: usize, world: usize, timeout: Duration) -> Self {
        let shared = Arc::new(WatchState {
            epoch: Instant::now(),
            started: AtomicU64::new(0),
            count: AtomicU64::new(0),
            op: Mutex::new(""),
            stop: AtomicBool::new(false),
        });
        let state = Arc::clone(&shared);
        // Polling a twentieth of the timeout bounds the overshoot to 5 %.
        let poll = (timeout / 20).clamp(Duration::from_millis(10), Duration::from_millis(500));
        let thread = std::thread::Builder::new()
            .name("bd3-dist-watchdog".into())
            .spawn(move || {
                while !state.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(poll);
                    let started = state.started.load(Ordering::SeqCst);
                    if started == 0 {
                        continue;
                    }
                    let since = Duration::from_millis(started - 1);
                    if state.epoch.elapsed().saturating_sub(since) > timeout {
                        let op = *state.op.lock().unwrap_or_else(|e| e.into_inner());
                        let count = state.count.load(Ordering::SeqCst);
                        // One write of the whole line: the launcher merges every rank's stderr.
                        let line = format!(
                            "bd3 rank {rank}/{world}: collective #{count} ({op}) did not complete within {:.1} s \
                             (dist.timeout_s): a peer rank has died or stopped; exiting\n",
                            timeout.as_secs_f64()
                        );
                        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
                        // _exit: no MPI_Finalize or destructors, which could wait on the dead peer.
                        // SAFETY: _exit ends the process immediately; no Rust state is used after.
                        unsafe { libc::_exit(TIMEOUT_EXIT_CODE) };
                    }
                }
            })
            .expect("spawning the collective watchdog thread");
        Self { shared, thread: Some(thread) }
    }

    pub(crate) fn enter(&self, op: &'static str) -> WatchGuard<'_> {
        let s = &self.shared;
        *s.op.lock().unwrap_or_else(|e| e.into_inner()) = op;
        s.count.fetch_add(1, Ordering::SeqCst);
        s.started.store(s.epoch.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        WatchGuard(s)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
