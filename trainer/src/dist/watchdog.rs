//! The watchdog of the collectives: a rank whose collective has not completed within
//! `dist.timeout_s` (a peer died or stopped) prints which one and exits, so no rank of a broken
//! job hangs forever whatever its launcher does.
//!
//! Two kinds of collectives are watched: blocking ones, from [`Watchdog::enter`] until the guard
//! drops, and ones the host does not wait for (NCCL collectives enqueued on a stream while backward
//! goes on), from [`Watchdog::track`] until their completion test passes.

use std::collections::VecDeque;
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
    /// Collectives the host did not wait for, oldest first, until their test says done.
    tracked: Mutex<VecDeque<Tracked>>,
    stop: AtomicBool,
}

struct Tracked {
    op: &'static str,
    count: u64,
    started: Instant,
    done: Box<dyn FnMut() -> bool + Send>,
}

impl WatchState {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            started: AtomicU64::new(0),
            count: AtomicU64::new(0),
            op: Mutex::new(""),
            tracked: Mutex::new(VecDeque::new()),
            stop: AtomicBool::new(false),
        }
    }

    fn track(&self, op: &'static str, done: Box<dyn FnMut() -> bool + Send>) {
        let count = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        let entry = Tracked { op, count, started: Instant::now(), done };
        self.tracked.lock().unwrap_or_else(|e| e.into_inner()).push_back(entry);
    }

    /// The first watched collective that has run longer than `timeout`: (its number, its name).
    fn overdue(&self, timeout: Duration) -> Option<(u64, &'static str)> {
        let started = self.started.load(Ordering::SeqCst);
        if started != 0 && self.epoch.elapsed().saturating_sub(Duration::from_millis(started - 1)) > timeout {
            let op = *self.op.lock().unwrap_or_else(|e| e.into_inner());
            return Some((self.count.load(Ordering::SeqCst), op));
        }
        // Collectives complete in the order they were enqueued: only the oldest can be overdue.
        // Its test runs outside the lock: a CUDA query stalled on a driver lock must not stop
        // `track` on the communication thread.
        loop {
            let mut front = self.tracked.lock().unwrap_or_else(|e| e.into_inner()).pop_front()?;
            if (front.done)() {
                continue;
            }
            let overdue = (front.started.elapsed() > timeout).then_some((front.count, front.op));
            self.tracked.lock().unwrap_or_else(|e| e.into_inner()).push_front(front);
            return overdue;
        }
    }
}

pub(crate) struct WatchGuard<'a>(&'a WatchState);

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        self.0.started.store(0, Ordering::SeqCst);
    }
}

impl Watchdog {
    pub(crate) fn start(rank: usize, world: usize, timeout: Duration) -> Self {
        let shared = Arc::new(WatchState::new());
        let state = Arc::clone(&shared);
        // Polling a twentieth of the timeout bounds the overshoot to 5 %.
        let poll = (timeout / 20).clamp(Duration::from_millis(10), Duration::from_millis(500));
        let thread = std::thread::Builder::new()
            .name("bd3-dist-watchdog".into())
            .spawn(move || {
                while !state.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(poll);
                    if let Some((count, op)) = state.overdue(timeout) {
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

    /// Watches a collective the host does not wait for until `done()` says it has completed
    /// (`done` runs on the watchdog's thread and must not block).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn track(&self, op: &'static str, done: impl FnMut() -> bool + Send + 'static) {
        self.shared.track(op, Box::new(done));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collective_the_host_does_not_wait_for_is_overdue_only_until_it_completes() {
        let state = WatchState::new();
        let timeout = Duration::from_millis(500);
        assert_eq!(state.overdue(timeout), None);
        let first_done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&first_done);
        state.track("ncclAllReduce", Box::new(move || flag.load(Ordering::SeqCst)));
        state.track("ncclReduceScatter", Box::new(|| false));
        assert_eq!(state.overdue(timeout), None, "nothing has run for the timeout yet");
        std::thread::sleep(timeout * 2);
        assert_eq!(state.overdue(timeout), Some((1, "ncclAllReduce")), "the oldest pending one is named");
        first_done.store(true, Ordering::SeqCst);
        assert_eq!(state.overdue(timeout), Some((2, "ncclReduceScatter")), "a completed one is dropped");
        assert_eq!(state.tracked.lock().unwrap().len(), 1);
        // A blocking collective is watched as before, and reported first.
        let blocking = WatchState::new();
        blocking.count.store(7, Ordering::SeqCst);
        blocking.started.store(1, Ordering::SeqCst);
        *blocking.op.lock().unwrap() = "MPI_Allreduce";
        std::thread::sleep(timeout * 2);
        assert_eq!(blocking.overdue(timeout), Some((7, "MPI_Allreduce")));
    }
}
