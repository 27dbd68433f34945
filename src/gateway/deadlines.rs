//! One fixed delay for many waiters, without a timer per waiter: the listener's "answer
//! separately after `SEPARATE_AFTER`" (RFC 7252 §5.2.2) for every CON request.
//!
//! A tokio timer per request was a timer-wheel insertion, a re-registration and a removal
//! for each one (~550 instructions per request). The delay is the same for every request
//! of a listener and requests register in arrival order, so their deadlines come in order:
//! a FIFO of deadlines and one sweeper task that sleeps until the oldest one that is still
//! waited for does the same job.
//!
//! `Queue` is the pure part (the caller passes the time in); `Deadlines` shares it between
//! the request tasks (`Deadlines::wait`) and the sweeper task (`Deadlines::sweep`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

#[derive(Debug)]
enum Entry {
    /// Not due yet; the waiter's waker once it has polled.
    Waiting { due: Instant, waker: Option<Waker> },
    /// Due: the waiter is told on its next poll.
    Fired,
    /// The waiter is gone (finished or dropped).
    Done,
}

/// The deadlines in registration (= due) order; entry `id` is at `id - first`.
#[derive(Debug)]
pub struct Queue {
    delay: Duration,
    entries: VecDeque<Entry>,
    first: u64,
    /// Index of the first entry that may still be `Waiting` (all before it fired or ended).
    cursor: usize,
    /// The sweeper will look again by itself (it sleeps until a due time no later than any
    /// deadline registered since, as they come in order); otherwise it must be woken.
    armed: bool,
}

impl Queue {
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            entries: VecDeque::new(),
            first: 0,
            cursor: 0,
            armed: false,
        }
    }

    /// A deadline `delay` after `now`. `now` must not go back between calls (the queue
    /// relies on due times coming in order); an earlier `now` is treated as the latest.
    pub fn register(&mut self, now: Instant) -> u64 {
        let mut due = now + self.delay;
        if let Some(Entry::Waiting { due: last, .. }) = self.entries.back() {
            due = due.max(*last);
        }
        let id = self.first + self.entries.len() as u64;
        self.entries.push_back(Entry::Waiting { due, waker: None });
        id
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Entry> {
        let i = usize::try_from(id.checked_sub(self.first)?).ok()?;
        self.entries.get_mut(i)
    }

    /// Whether deadline `id` is due; if not, `waker` is woken when it is.
    pub fn poll_fired(&mut self, id: u64, waker: &Waker) -> bool {
        match self.get_mut(id) {
            Some(Entry::Waiting { waker: w, .. }) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    *w = Some(waker.clone());
                }
                false
            }
            Some(Entry::Fired) => true,
            // Done or forgotten: it cannot fire any more.
            Some(Entry::Done) | None => false,
        }
    }

    /// The waiter of `id` is gone; its entry is forgotten once it is the oldest.
    pub fn done(&mut self, id: u64) {
        if let Some(e) = self.get_mut(id) {
            *e = Entry::Done;
        }
        while let Some(Entry::Done) = self.entries.front() {
            self.entries.pop_front();
            self.first += 1;
            self.cursor = self.cursor.saturating_sub(1);
        }
    }

    /// Fires every deadline due at `now` and returns the wakers to wake (outside the lock)
    /// and when the next one is due.
    pub fn fire_due(&mut self, now: Instant, woken: &mut Vec<Waker>) -> Option<Instant> {
        let next = self.fire_due_inner(now, woken);
        self.armed = next.is_some();
        next
    }

    fn fire_due_inner(&mut self, now: Instant, woken: &mut Vec<Waker>) -> Option<Instant> {
        while let Some(e) = self.entries.get_mut(self.cursor) {
            match e {
                Entry::Waiting { due, waker } => {
                    if *due > now {
                        return Some(*due);
                    }
                    woken.extend(waker.take());
                    *e = Entry::Fired;
                }
                Entry::Fired | Entry::Done => {}
            }
            self.cursor += 1;
        }
        None
    }

    /// Entries kept (waiting, fired and not yet done, or done behind an older one).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A `Queue` shared by the request tasks and a sweeper task.
pub struct Deadlines {
    queue: Mutex<Queue>,
    /// Wakes the sweeper when a deadline is registered while it has none to wait for, or
    /// when the listener stops.
    wake: tokio::sync::Notify,
    stopped: std::sync::atomic::AtomicBool,
}

impl Deadlines {
    pub fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Queue::new(delay)),
            wake: tokio::sync::Notify::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A future that completes `delay` after now (never, if dropped first).
    pub fn wait(self: &Arc<Self>) -> Wait {
        self.wait_from(Instant::now())
    }

    /// A future that completes `delay` after `now` (the caller's recent clock reading;
    /// readings passed in must not go back, see `Queue::register`).
    pub fn wait_from(self: &Arc<Self>, now: Instant) -> Wait {
        let mut q = self.lock();
        let id = q.register(now);
        let idle = !q.armed;
        q.armed = true;
        drop(q);
        if idle {
            // The sweeper had nothing to wait for.
            self.wake.notify_one();
        }
        Wait {
            deadlines: Arc::clone(self),
            id,
        }
    }

    /// No more deadlines will be registered: the sweeper ends once the last one fired.
    pub fn stop(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// The sweeper: fires deadlines as they come due, until `stop` and nothing is waiting.
    pub async fn sweep(self: Arc<Self>) {
        let mut woken = Vec::new();
        loop {
            let next = self.lock().fire_due(Instant::now(), &mut woken);
            for w in woken.drain(..) {
                w.wake();
            }
            match next {
                Some(due) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.into()) => {}
                        // a stop: look again (a due deadline is never missed: sleep ends)
                        _ = self.wake.notified() => {}
                    }
                }
                None => {
                    if self.stopped.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    self.wake.notified().await;
                }
            }
        }
    }
}

/// `Deadlines` for a delay used wherever the owner is (the gateway's `upstream_timeout`):
/// the sweeper task starts at the first `wait` (which must run inside the tokio runtime
/// that then serves every wait) and stops when this is dropped.
pub struct LazyDeadlines {
    delay: Duration,
    inner: std::sync::OnceLock<Arc<Deadlines>>,
}

impl LazyDeadlines {
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            inner: std::sync::OnceLock::new(),
        }
    }

    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// A future that completes `delay` after now (never, if dropped first).
    pub fn wait(&self) -> Wait {
        self.inner
            .get_or_init(|| {
                let d = Deadlines::new(self.delay);
                tokio::spawn(Arc::clone(&d).sweep());
                d
            })
            .wait()
    }
}

impl Drop for LazyDeadlines {
    fn drop(&mut self) {
        if let Some(d) = self.inner.get() {
            d.stop();
        }
    }
}

/// `Deadlines::wait`'s future.
pub struct Wait {
    deadlines: Arc<Deadlines>,
    id: u64,
}

impl Future for Wait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.deadlines.lock().poll_fired(self.id, cx.waker()) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        self.deadlines.lock().done(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A waker that counts its wake-ups.
    struct Count(AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (Arc::clone(&c), Waker::from(c))
    }

    #[test]
    fn fires_in_order_after_the_delay_and_wakes_each_waiter_once() {
        let d = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut q = Queue::new(d);
        let (ca, wa) = waker();
        let (cb, wb) = waker();
        let a = q.register(t0);
        let b = q.register(t0 + Duration::from_millis(300));
        assert!(!q.poll_fired(a, &wa));
        assert!(!q.poll_fired(b, &wb));
        let mut woken = Vec::new();
        assert_eq!(q.fire_due(t0, &mut woken), Some(t0 + d));
        assert!(woken.is_empty());
        assert_eq!(
            q.fire_due(t0 + d, &mut woken),
            Some(t0 + d + Duration::from_millis(300))
        );
        woken.drain(..).for_each(Waker::wake);
        assert_eq!(ca.0.load(Ordering::Relaxed), 1);
        assert_eq!(cb.0.load(Ordering::Relaxed), 0);
        assert!(q.poll_fired(a, &wa));
        assert!(!q.poll_fired(b, &wb));
        assert_eq!(q.fire_due(t0 + 2 * d, &mut woken), None);
        woken.drain(..).for_each(Waker::wake);
        assert_eq!(cb.0.load(Ordering::Relaxed), 1);
        assert!(q.poll_fired(b, &wb));
        // firing again wakes nobody
        assert_eq!(q.fire_due(t0 + 3 * d, &mut woken), None);
        assert!(woken.is_empty());
        q.done(b);
        assert_eq!(q.len(), 2); // `a` is older and not done
        q.done(a);
        assert!(q.is_empty());
    }

    #[test]
    fn done_before_due_never_fires_and_is_forgotten_in_order() {
        let d = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut q = Queue::new(d);
        let ids: Vec<u64> = (0..5)
            .map(|i| q.register(t0 + Duration::from_millis(i)))
            .collect();
        let (c, w) = waker();
        for &id in &ids {
            assert!(!q.poll_fired(id, &w));
        }
        // the middle ones finish first: kept until the older ones are done
        q.done(ids[1]);
        q.done(ids[2]);
        assert_eq!(q.len(), 5);
        q.done(ids[0]);
        assert_eq!(q.len(), 2);
        let mut woken = Vec::new();
        assert_eq!(q.fire_due(t0 + 2 * d, &mut woken), None);
        assert_eq!(woken.len(), 2); // ids 3 and 4
        assert!(!q.poll_fired(ids[1], &w), "a done deadline does not fire");
        assert!(q.poll_fired(ids[3], &w));
        q.done(ids[3]);
        q.done(ids[4]);
        assert!(q.is_empty());
        drop(woken);
        assert_eq!(c.0.load(Ordering::Relaxed), 0);
        // ids go on after the queue emptied
        let next = q.register(t0 + 3 * d);
        assert_eq!(next, ids[4] + 1);
        assert!(!q.poll_fired(next, &w));
    }

    #[test]
    fn a_time_going_back_does_not_reorder() {
        let d = Duration::from_secs(1);
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut q = Queue::new(d);
        let (_c, w) = waker();
        let a = q.register(t0);
        let b = q.register(t0 - Duration::from_millis(5));
        assert!(!q.poll_fired(a, &w) && !q.poll_fired(b, &w));
        let mut woken = Vec::new();
        assert_eq!(q.fire_due(t0 + d, &mut woken), None);
        assert_eq!(woken.len(), 2);
    }

    /// Through tokio: waiters complete (the delay itself is checked on the pure queue
    /// above, not by the clock), one that is dropped early does not hold the others up, a
    /// wait after the queue went idle wakes the sweeper, and the sweeper ends after `stop`.
    #[tokio::test]
    async fn waits_complete_and_the_sweeper_ends_after_stop() {
        let d = Deadlines::new(Duration::from_millis(20));
        let sweeper = tokio::spawn(Arc::clone(&d).sweep());
        let first = d.wait();
        let dropped = d.wait();
        let second = d.wait();
        drop(dropped);
        first.await;
        second.await;
        assert!(d.lock().is_empty());
        // idle now: a new wait must wake the sweeper
        tokio::time::sleep(Duration::from_millis(30)).await;
        d.wait().await;
        d.stop();
        sweeper.await.unwrap();
        assert!(d.lock().is_empty());
    }

    /// A wait that loses a `select!` against a quicker future is dropped and leaves nothing
    /// behind; one that wins completes. The sweeper stops with its owner.
    #[tokio::test]
    async fn lazy_deadlines_as_a_timeout() {
        let lazy = LazyDeadlines::new(Duration::from_millis(20));
        let quick = tokio::select! {
            biased;
            _ = std::future::ready(()) => true,
            _ = lazy.wait() => false,
        };
        assert!(quick);
        let slow = tokio::select! {
            biased;
            _ = std::future::pending::<()>() => false,
            _ = lazy.wait() => true,
        };
        assert!(slow);
        let d = Arc::clone(lazy.inner.get().unwrap());
        assert!(d.lock().is_empty());
        drop(lazy);
        // the sweeper ends: only this test's handle is left
        while Arc::strong_count(&d) > 1 {
            tokio::task::yield_now().await;
        }
    }
}
