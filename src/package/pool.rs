//! The threads that write and hash packages, shared by every transfer of the process
//! (`docs/evidence-format.md` §7, "Threads"). One [`PackageThreads`] per process, sized from
//! `download.concurrency`, holds:
//!
//! - a fixed set of hashing threads, started as work first needs them, that serve [`Lane`]s: a
//!   lane is one stream of work of one package (its payload's SHA-256, its MD5, the gunzipped
//!   stream's SHA-256, the package file's SHA-256, the read-back), fed in order through its own
//!   queue. A thread takes one message (about a MiB) of the lane at the head of the ready
//!   queue and puts the lane back at its tail when it has more, so lanes are served round
//!   robin: a large transfer cannot starve a small one, and a lane is never run by two threads
//!   at once (its bytes stay in order). A job never waits for another lane, so the threads
//!   cannot deadlock;
//! - a few permits for the writers' own work (compressing and writing a batch), run with
//!   [`PackageThreads::section`] on tokio's blocking threads;
//! - per package, a [`Window`] of batches in flight: every message carries the [`Ticket`] of
//!   the batch it came from, a batch's slot is free again once every lane has taken it, and a
//!   writer starts no batch while its window, or the process's budget of batches in flight
//!   ([`BUDGET_PER_THREAD`] per hashing thread), is full. Memory stays flat however many
//!   transfers run, and a writer never holds a permit while it waits for the hashing.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Hashing threads per transfer the budget allows, before the cap by cores.
const HASHING_PER_TRANSFER: usize = 4;
/// Batches in flight in the whole process, per hashing thread: enough to keep every thread
/// busy, few enough that memory does not grow with the number of transfers.
const BUDGET_PER_THREAD: usize = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The process's package threads; cheap to clone (see the module docs).
#[derive(Clone)]
pub struct PackageThreads {
    shared: Arc<Shared>,
    writers: Arc<tokio::sync::Semaphore>,
    budget: Arc<Budget>,
    /// The hashing threads end when the last handle (and so the last lane) is gone.
    _owner: Arc<Owner>,
}

struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
    threads: usize,
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<Arc<dyn Job>>,
    spawned: usize,
    idle: usize,
    running: usize,
    peak_running: usize,
    shutdown: bool,
}

struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        lock(&self.0.queue).shutdown = true;
        self.0.work.notify_all();
    }
}

impl PackageThreads {
    /// For `concurrency` transfers at once: up to [`HASHING_PER_TRANSFER`] hashing threads per
    /// transfer, at most two per core (at least four); writer permits, one per transfer, at
    /// most one per core (at least two).
    pub fn for_transfers(concurrency: usize) -> PackageThreads {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let concurrency = concurrency.max(1);
        let hashing = (concurrency * HASHING_PER_TRANSFER).min((2 * cores).max(4));
        PackageThreads::with_threads(hashing, concurrency.min(cores.max(2)))
    }

    /// Exactly `hashing` hashing threads (at most) and `writers` writer permits (at least one).
    pub fn with_threads(hashing: usize, writers: usize) -> PackageThreads {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
            threads: hashing.max(1),
        });
        PackageThreads {
            _owner: Arc::new(Owner(shared.clone())),
            budget: Budget::new(BUDGET_PER_THREAD * shared.threads),
            shared,
            writers: Arc::new(tokio::sync::Semaphore::new(writers.max(1))),
        }
    }

    /// The most hashing threads this pool starts.
    pub fn hashing_threads(&self) -> usize {
        self.shared.threads
    }

    /// Hashing threads started so far, and the most jobs that ever ran at once.
    pub fn started_and_peak(&self) -> (usize, usize) {
        let q = lock(&self.shared.queue);
        (q.spawned, q.peak_running)
    }

    /// Runs `f` on a blocking thread once a writer permit is free.
    pub(crate) async fn section<T, F>(&self, f: F) -> Result<T, tokio::task::JoinError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        // The semaphore is never closed.
        let _permit = self.writers.acquire().await;
        tokio::task::spawn_blocking(f).await
    }

    /// A new lane whose messages `feed` hands, in order, to `state`.
    pub(crate) fn lane<S, M>(&self, state: S, feed: fn(&mut S, M)) -> Lane<S, M>
    where
        S: Send + 'static,
        M: Send + 'static,
    {
        Lane {
            inner: Arc::new(LaneInner {
                shared: self.shared.clone(),
                state: Mutex::new(LaneState {
                    queue: VecDeque::new(),
                    data: Some(state),
                    scheduled: false,
                    running: false,
                    failed: false,
                    dropped: false,
                }),
                moved: Condvar::new(),
                feed,
            }),
            _threads: self.clone(),
            done: false,
        }
    }
}

impl std::fmt::Debug for PackageThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackageThreads")
            .field("hashing", &self.shared.threads)
            .finish_non_exhaustive()
    }
}

/// Two handles are equal when they share their threads.
impl PartialEq for PackageThreads {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Eq for PackageThreads {}

impl Shared {
    /// Queues a lane with work; starts a thread when none is idle and the pool is not full.
    fn schedule(self: &Arc<Self>, job: Arc<dyn Job>) {
        let mut q = lock(&self.queue);
        q.ready.push_back(job);
        if q.idle > 0 {
            drop(q);
            self.work.notify_one();
            return;
        }
        if q.spawned >= self.threads {
            return;
        }
        let shared = self.clone();
        let started = std::thread::Builder::new()
            .name("lrvault-hash".into())
            .spawn(move || shared.serve());
        match started {
            Ok(_) => q.spawned += 1,
            Err(e) if q.spawned == 0 => {
                // No thread at all would leave the lane waiting forever: run it here.
                tracing::warn!(error = %e, "cannot start a hashing thread; hashing inline");
                let job = q.ready.pop_back();
                drop(q);
                if let Some(job) = job {
                    job.run();
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot start another hashing thread"),
        }
    }

    /// A hashing thread: one message of the lane at the head of the ready queue at a time.
    fn serve(&self) {
        let mut q = lock(&self.queue);
        loop {
            let Some(job) = q.ready.pop_front() else {
                if q.shutdown {
                    q.spawned -= 1;
                    return;
                }
                q.idle += 1;
                q = self.work.wait(q).unwrap_or_else(|p| p.into_inner());
                q.idle -= 1;
                continue;
            };
            q.running += 1;
            q.peak_running = q.peak_running.max(q.running);
            drop(q);
            job.run();
            q = lock(&self.queue);
            q.running -= 1;
        }
    }
}

/// One message of a lane, run by a hashing thread.
trait Job: Send + Sync {
    fn run(self: Arc<Self>);
}

/// One package's stream of work, fed in order (see the module docs).
pub(crate) struct Lane<S: Send + 'static, M: Send + 'static> {
    inner: Arc<LaneInner<S, M>>,
    /// Keeps the threads alive while the lane may still have work.
    _threads: PackageThreads,
    done: bool,
}

struct LaneInner<S, M> {
    shared: Arc<Shared>,
    state: Mutex<LaneState<S, M>>,
    /// A message was taken or the lane went idle.
    moved: Condvar,
    feed: fn(&mut S, M),
}

struct LaneState<S, M> {
    queue: VecDeque<(M, Option<Ticket>)>,
    /// `None` while a thread works on it, or once the lane failed or was dropped.
    data: Option<S>,
    /// In the ready queue or running.
    scheduled: bool,
    running: bool,
    /// `feed` panicked: the rest is discarded and `finish` reports it.
    failed: bool,
    dropped: bool,
}

impl<S: Send + 'static, M: Send + 'static> Lane<S, M> {
    /// Queues a message; it holds `ticket` (its batch's slot) until it has been fed.
    pub(crate) fn push(&self, message: M, ticket: Option<Ticket>) {
        let mut st = lock(&self.inner.state);
        if st.failed {
            return;
        }
        st.queue.push_back((message, ticket));
        if !st.scheduled {
            st.scheduled = true;
            drop(st);
            self.inner.shared.schedule(self.inner.clone());
        }
    }

    /// Waits until every message has been fed, then hands the state to `f` (on this thread);
    /// `None` if `feed` panicked.
    pub(crate) fn finish<T>(mut self, f: impl FnOnce(S) -> T) -> Option<T> {
        self.done = true;
        let mut st = lock(&self.inner.state);
        while st.scheduled {
            st = self.inner.moved.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let data = st.data.take();
        drop(st);
        data.map(f)
    }
}

impl<S: Send + 'static, M: Send + 'static> Drop for Lane<S, M> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = lock(&self.inner.state);
        st.dropped = true;
        let queued = std::mem::take(&mut st.queue);
        let data = st.data.take();
        drop(st);
        drop((queued, data));
    }
}

impl<S: Send + 'static, M: Send + 'static> Job for LaneInner<S, M> {
    fn run(self: Arc<Self>) {
        let mut st = lock(&self.state);
        let (Some((message, ticket)), Some(mut data)) = (st.queue.pop_front(), st.data.take())
        else {
            st.scheduled = false;
            drop(st);
            self.moved.notify_all();
            return;
        };
        st.running = true;
        drop(st);
        let fed = catch_unwind(AssertUnwindSafe(|| (self.feed)(&mut data, message)));
        drop(ticket);
        let mut st = lock(&self.state);
        st.running = false;
        match fed {
            Ok(()) if !st.dropped => st.data = Some(data),
            Ok(()) => {}
            Err(_) => {
                st.failed = true;
                st.queue.clear();
            }
        }
        let again = !st.queue.is_empty() && st.data.is_some();
        st.scheduled = again;
        drop(st);
        self.moved.notify_all();
        if again {
            self.shared.schedule(self.clone());
        }
    }
}

/// Batches in flight in the whole process, shared by every package's [`Window`].
struct Budget {
    limit: usize,
    /// Batches in flight in all, under which every window's own count changes too.
    taken: Mutex<usize>,
    freed: Condvar,
    notify: tokio::sync::Notify,
}

impl Budget {
    fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit: limit.max(1),
            taken: Mutex::new(0),
            freed: Condvar::new(),
            notify: tokio::sync::Notify::new(),
        })
    }
}

/// A package's batches in flight (see the module docs): at most its own limit, and at most
/// the process's budget for all packages.
#[derive(Clone)]
pub(crate) struct Window {
    budget: Arc<Budget>,
    own: Arc<AtomicUsize>,
    limit: usize,
}

/// A batch's slot in its [`Window`]; free again when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Ticket {
    _slot: Arc<Slot>,
}

struct Slot {
    budget: Arc<Budget>,
    own: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = lock(&self.budget.taken);
        *taken -= 1;
        self.own.fetch_sub(1, Ordering::Relaxed);
        drop(taken);
        self.budget.freed.notify_all();
        self.budget.notify.notify_waiters();
    }
}

impl PackageThreads {
    /// A new package's window of at most `limit` batches in flight, within the budget.
    pub(crate) fn window(&self, limit: usize) -> Window {
        Window {
            budget: self.budget.clone(),
            own: Arc::default(),
            limit: limit.max(1),
        }
    }
}

impl Window {
    /// At most `limit` batches in flight, with a budget of its own.
    #[cfg(test)]
    pub(crate) fn new(limit: usize) -> Window {
        Window {
            budget: Budget::new(limit),
            own: Arc::default(),
            limit: limit.max(1),
        }
    }

    fn room(&self, taken: usize) -> bool {
        self.own.load(Ordering::Relaxed) < self.limit && taken < self.budget.limit
    }

    /// A slot for the next batch; waits while the window or the budget is full.
    pub(crate) fn take(&self) -> Ticket {
        let mut taken = lock(&self.budget.taken);
        while !self.room(*taken) {
            taken = self
                .budget
                .freed
                .wait(taken)
                .unwrap_or_else(|p| p.into_inner());
        }
        *taken += 1;
        self.own.fetch_add(1, Ordering::Relaxed);
        Ticket {
            _slot: Arc::new(Slot {
                budget: self.budget.clone(),
                own: self.own.clone(),
            }),
        }
    }

    /// True when a batch can start without waiting.
    pub(crate) fn has_room(&self) -> bool {
        self.room(*lock(&self.budget.taken))
    }

    /// Waits until a batch can start (or, with `drained`, until none is in flight).
    pub(crate) async fn ready(&self, drained: bool) {
        loop {
            let notified = self.budget.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let ok = match drained {
                true => self.own.load(Ordering::Relaxed) == 0,
                false => self.has_room(),
            };
            if ok {
                return;
            }
            notified.await;
        }
    }

    /// This package's batches in flight now.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.own.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::mpsc;
    use std::thread::ThreadId;

    type Seen = Arc<Mutex<HashSet<ThreadId>>>;

    #[test]
    fn many_lanes_never_use_more_than_the_pools_threads() {
        let threads = PackageThreads::with_threads(2, 1);
        let seen: Seen = Arc::default();
        let lanes: Vec<Lane<(Seen, u64), u64>> = (0..16)
            .map(|_| {
                threads.lane((seen.clone(), 0), |(seen, sum), n| {
                    lock(seen).insert(std::thread::current().id());
                    *sum += n;
                })
            })
            .collect();
        for n in 1..=50 {
            for lane in &lanes {
                lane.push(n, None);
            }
        }
        for lane in lanes {
            assert_eq!(lane.finish(|(_, sum)| sum), Some(50 * 51 / 2));
        }
        let (started, peak) = threads.started_and_peak();
        assert!(started <= 2 && peak <= 2, "started {started}, peak {peak}");
        assert!(lock(&seen).len() <= 2, "{:?}", lock(&seen));
        assert!(!lock(&seen).contains(&std::thread::current().id()));
    }

    /// Lane state of the large transfer: each message waits for a go from the test.
    struct Gated {
        go: mpsc::Receiver<()>,
        fed: Arc<Mutex<u64>>,
    }

    /// A lane whose messages each wait for a go; counts those fed.
    fn gated(threads: &PackageThreads) -> (Lane<Gated, ()>, mpsc::Sender<()>, Arc<Mutex<u64>>) {
        let (go, gate) = mpsc::channel();
        let fed = Arc::new(Mutex::new(0u64));
        let state = Gated {
            go: gate,
            fed: fed.clone(),
        };
        let lane = threads.lane(state, |g, ()| {
            g.go.recv().unwrap();
            *lock(&g.fed) += 1;
        });
        (lane, go, fed)
    }

    #[test]
    fn a_small_transfer_finishes_while_a_large_one_streams() {
        let threads = PackageThreads::with_threads(1, 1);
        let (large, go, fed) = gated(&threads);
        for _ in 0..100 {
            large.push((), None);
        }
        // The only thread is inside the large lane's first message, waiting for its go.
        let small = threads.lane(0u32, |sum, n: u32| *sum += n);
        small.push(7, None);
        go.send(()).unwrap();
        // Round robin: the small lane was queued before the large one came back.
        assert_eq!(small.finish(|sum| sum), Some(7));
        assert_eq!(*lock(&fed), 1, "the large transfer is still streaming");
        for _ in 1..100 {
            go.send(()).unwrap();
        }
        assert_eq!(large.finish(|g| *lock(&g.fed)), Some(100));
        assert_eq!(threads.started_and_peak(), (1, 1));
    }

    #[test]
    fn a_panicking_lane_reports_it_and_the_thread_goes_on() {
        let threads = PackageThreads::with_threads(1, 1);
        let bad = threads.lane((), |_, n: u32| assert_ne!(n, 2));
        for n in 1..=3 {
            bad.push(n, None);
        }
        assert_eq!(bad.finish(|()| ()), None);
        let good = threads.lane(0u32, |sum, n| *sum += n);
        good.push(5, None);
        assert_eq!(good.finish(|sum| sum), Some(5));
    }

    #[test]
    fn tickets_free_the_window_once_every_lane_has_fed_them() {
        let threads = PackageThreads::with_threads(1, 1);
        let (lane, go, fed) = gated(&threads);
        let window = Window::new(2);
        let first = window.take();
        lane.push((), Some(first.clone()));
        lane.push((), Some(first));
        lane.push((), Some(window.take()));
        assert_eq!(window.in_flight(), 2);
        go.send(()).unwrap();
        go.send(()).unwrap();
        // Both messages of the first batch are fed: its slot is free.
        let third = window.take();
        assert_eq!(*lock(&fed), 2);
        drop(third);
        go.send(()).unwrap();
        assert_eq!(lane.finish(|g| *lock(&g.fed)), Some(3));
        assert_eq!(window.in_flight(), 0);
    }

    #[test]
    fn every_window_shares_the_process_budget() {
        // One hashing thread: a budget of BUDGET_PER_THREAD batches for all packages.
        let threads = PackageThreads::with_threads(1, 1);
        let (large, small) = (threads.window(8), threads.window(8));
        let mut held: Vec<Ticket> = (0..BUDGET_PER_THREAD).map(|_| large.take()).collect();
        assert!(
            !large.has_room() && !small.has_room(),
            "the budget is spent"
        );
        held.pop();
        assert!(small.has_room());
        let _mine = small.take();
        assert_eq!((large.in_flight(), small.in_flight()), (3, 1));
        // A window's own limit binds below the budget.
        let one = PackageThreads::with_threads(4, 1).window(1);
        let _first = one.take();
        assert!(!one.has_room());
    }
}
