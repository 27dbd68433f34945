//! Adaptive busy polling (`coap.busy_poll_us`): after datagram activity, keep the gateway's
//! current-thread runtime from sleeping in epoll for a while, so that the next datagram (the
//! origin's answer, the client's next request) is picked up without waking a halted CPU.
//! On a VM a cross-core wake-up of an idle vCPU costs tens of µs per hop.
//!
//! How: a spinner task loops on `tokio::task::yield_now()`. In tokio's current-thread
//! scheduler (1.54, `scheduler/current_thread`), a yielded task is *deferred*; when the run
//! queue is empty and deferred tasks exist, the scheduler calls `park_yield`, which polls
//! the I/O and timer drivers with a zero timeout instead of blocking. So while the spinner
//! runs, every readiness is seen at once. When no datagram was seen for `window`, the
//! spinner waits on a `Notify` and the thread sleeps as usual: no CPU when idle.
//!
//! Cost: one core busy while traffic flows (and for `window` after it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Datagram activity seen by the sockets of one gateway.
#[derive(Debug, Default)]
pub struct Activity {
    /// Datagrams seen (only compared for change).
    seen: AtomicU64,
    /// The spinner is spinning (then `touch` need not wake it).
    spinning: AtomicBool,
    wake: Notify,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A datagram was received: keep spinning, or start again.
    #[inline]
    pub fn touch(&self) {
        self.seen.fetch_add(1, Ordering::Relaxed);
        if !self.spinning.load(Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    /// Runs until the runtime ends: spins after activity, sleeps after `window` without.
    pub async fn spin(self: Arc<Self>, window: Duration) {
        loop {
            self.wake.notified().await;
            self.spinning.store(true, Ordering::Relaxed);
            let mut seen = self.seen.load(Ordering::Relaxed);
            let mut last = Instant::now();
            loop {
                tokio::task::yield_now().await;
                // Give this CPU to another runnable thread, if any (the origin or the
                // client may share it): spinning then costs only otherwise idle time.
                std::thread::yield_now();
                let now_seen = self.seen.load(Ordering::Relaxed);
                let now = Instant::now();
                if now_seen != seen {
                    seen = now_seen;
                    last = now;
                } else if now.duration_since(last) >= window {
                    break;
                }
            }
            self.spinning.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spinner stops after `window` without activity (the runtime can then sleep) and
    /// starts again on the next datagram.
    #[tokio::test(flavor = "current_thread")]
    async fn spins_after_activity_and_stops_when_idle() {
        let a = Activity::new();
        let spinner = tokio::spawn(Arc::clone(&a).spin(Duration::from_millis(20)));
        tokio::task::yield_now().await;
        assert!(
            !a.spinning.load(Ordering::Relaxed),
            "idle before any datagram"
        );
        a.touch();
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert!(
            a.spinning.load(Ordering::Relaxed),
            "spinning after a datagram"
        );
        // A timer still fires while spinning: the driver is polled with a zero timeout.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(
            !a.spinning.load(Ordering::Relaxed),
            "stopped after the window"
        );
        a.touch();
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert!(a.spinning.load(Ordering::Relaxed), "spinning again");
        spinner.abort();
    }
}
