//! A private, caller-sized thread pool on rayon, and the parallel loops the kernels use.
//!
//! Ember never uses a global pool: a host application decides how many cores inference may
//! use, per session or per [`ThreadPool`] shared by sessions. The calling thread works too,
//! so `n` threads means a private `rayon::ThreadPool` of `n - 1` workers.
//!
//! A decode step at 135M parameters runs about 200 parallel loops a few microseconds apart;
//! entering rayon for each (a fork-join per loop, with its sleep/wake and work stealing) cost
//! about 7% of the step when measured. So rayon is entered once, not per loop: when the pool
//! is made, one `spawn_broadcast` puts a worker loop on each rayon thread, and loops are
//! handed to them through an atomic task counter (each task claimed by whichever thread is
//! free). Between loops workers spin briefly, then sleep on a condition variable, so an idle
//! pool costs nothing. Entering rayon per step instead (a `broadcast` per step) would
//! allocate its job list on every step; a decode step allocates nothing (`tests/no_alloc.rs`).
//!
//! rayon's threads are made through `spawn_handler`, which keeps their join handles: dropping
//! the pool joins every thread before it returns (a host may unload the library next), where
//! rayon alone lets them finish after `drop` returns.
//!
//! Work is split by output element, each element computed by one thread in a fixed order, so
//! results do not depend on the thread count or on which thread claims which task.

use std::any::Any;
use std::marker::PhantomData;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::session::together::StepQueue;
use crate::session::CombinedSteps;

/// How long an idle worker spins, waiting for the next loop, before it sleeps.
const SPIN: Duration = Duration::from_micros(100);

/// One parallel loop: `n_tasks` calls of `task`, claimed one by one by whichever thread is
/// free.
struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    n_tasks: usize,
    next: AtomicUsize,
    remaining: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job<'_> {
    /// Claims and runs tasks until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.n_tasks {
                return;
            }
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (self.task)(i))) {
                if let Ok(mut slot) = self.panic.lock() {
                    slot.get_or_insert(payload);
                }
            }
            self.remaining.fetch_sub(1, SeqCst);
        }
    }
}

/// State shared by the caller and the workers.
struct Shared {
    /// The current job, or NULL. Points to a `Job` on the caller's stack, which stays alive
    /// until the caller has seen `in_job == 0` after clearing this pointer.
    job: AtomicPtr<Job<'static>>,
    /// Incremented for every job, and at shutdown.
    epoch: AtomicU64,
    /// Workers currently looking at `job`.
    in_job: AtomicUsize,
    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    /// Workers whose loop has started.
    started: AtomicUsize,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    /// Tests: workers sleep a moment after each wake-up.
    #[cfg(test)]
    pause_after_wake: AtomicBool,
}

impl Shared {
    /// Waits until the epoch differs from `seen`; returns the epoch it saw, or None at
    /// shutdown. The caller waits next for a change from the returned epoch (not from one
    /// read later, which might already be the shutdown's and would never change again).
    fn wait_for_work(&self, seen: u64) -> Option<u64> {
        let start = Instant::now();
        let mut spins = 0u32;
        let mut now = self.epoch.load(SeqCst);
        while now == seen {
            std::hint::spin_loop();
            spins += 1;
            if spins % 64 == 0 && start.elapsed() > SPIN {
                let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
                self.sleepers.fetch_add(1, SeqCst);
                while self.epoch.load(SeqCst) == seen {
                    guard = self.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
                }
                self.sleepers.fetch_sub(1, SeqCst);
            }
            now = self.epoch.load(SeqCst);
        }
        // The shutdown flag is set before its epoch: seeing that epoch means seeing the flag.
        (!self.shutdown.load(SeqCst)).then_some(now)
    }

    /// The loop each rayon thread runs from the pool's creation to its drop.
    fn worker(&self) {
        self.started.fetch_add(1, SeqCst);
        let mut seen = 0;
        loop {
            let Some(epoch) = self.wait_for_work(seen) else {
                return;
            };
            seen = epoch;
            #[cfg(test)]
            if self.pause_after_wake.load(SeqCst) {
                // Where a busy machine may preempt a worker: the job can end meanwhile.
                std::thread::sleep(Duration::from_millis(50));
            }
            self.in_job.fetch_add(1, SeqCst);
            let job = self.job.load(SeqCst);
            // SAFETY: a non-NULL job pointer stays valid while `in_job` counts this worker:
            // the caller clears the pointer, then waits for `in_job == 0` before its Job dies.
            if let Some(job) = unsafe { job.as_ref() } {
                job.work();
            }
            self.in_job.fetch_sub(1, SeqCst);
        }
    }

    fn notify(&self) {
        if self.sleepers.load(SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_all();
        }
    }

    fn shut_down(&self) {
        self.shutdown.store(true, SeqCst);
        self.epoch.fetch_add(1, SeqCst);
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.notify_all();
    }
}

/// First come, first served turns on the pool: sessions sharing it step one at a time, in
/// the order they asked (a plain mutex lets a session that steps in a loop take every turn).
#[derive(Default)]
struct Turns {
    /// (next ticket to hand out, ticket being served)
    tickets: Mutex<(u64, u64)>,
    changed: Condvar,
}

impl Turns {
    /// Waits for this caller's turn; the turn ends when the guard drops.
    fn take(&self) -> Turn<'_> {
        let mut t = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let mine = t.0;
        t.0 += 1;
        while t.1 != mine {
            t = self.changed.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        Turn { turns: self }
    }
}

/// One caller's turn on a pool.
struct Turn<'a> {
    turns: &'a Turns,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut t = self.turns.tickets.lock().unwrap_or_else(|p| p.into_inner());
        t.1 += 1;
        drop(t);
        self.turns.changed.notify_all();
    }
}

/// A pool of `n_threads - 1` rayon worker threads plus the calling thread.
pub struct ThreadPool {
    shared: Arc<Shared>,
    /// The rayon pool whose threads run [`Shared::worker`]; `None` for one thread.
    rayon: Option<rayon::ThreadPool>,
    /// Join handles of the rayon pool's threads, kept by its spawn handler.
    threads: Vec<JoinHandle<()>>,
    n_threads: usize,
    turns: Turns,
    /// The generation steps of the sessions on this pool, combined into shared passes.
    pub(crate) steps: StepQueue,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads)
            .finish()
    }
}

impl ThreadPool {
    /// Creates a pool whose loops run on `n_threads` threads, the caller's included
    /// (`n_threads == 1` starts no thread).
    pub fn new(n_threads: usize) -> Result<ThreadPool> {
        if n_threads == 0 || n_threads > 1024 {
            return Err(Error::InvalidArgument(format!(
                "thread count {n_threads} (must be 1..=1024)"
            )));
        }
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicU64::new(0),
            in_job: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            #[cfg(test)]
            pause_after_wake: AtomicBool::new(false),
        });
        let mut pool = ThreadPool {
            shared,
            rayon: None,
            threads: Vec::with_capacity(n_threads - 1),
            n_threads,
            turns: Turns::default(),
            steps: StepQueue::default(),
        };
        if n_threads == 1 {
            return Ok(pool);
        }
        let threads = &mut pool.threads;
        let rayon = rayon::ThreadPoolBuilder::new()
            .num_threads(n_threads - 1)
            .thread_name(|i| format!("ember-worker-{}", i + 1))
            .spawn_handler(|thread| {
                let mut builder = std::thread::Builder::new();
                if let Some(name) = thread.name() {
                    builder = builder.name(name.to_owned());
                }
                threads.push(builder.spawn(|| thread.run())?);
                Ok(())
            })
            .build()
            .map_err(|e| Error::Internal(format!("could not start the worker threads: {e}")));
        // On failure `pool` drops here, joining whatever threads did start.
        let rayon = rayon?;
        let shared = pool.shared.clone();
        // The worker loop never panics (tasks' panics are caught in `Job::work`), so rayon's
        // handler for a panicking broadcast (abort) is never reached.
        rayon.spawn_broadcast(move |_| shared.worker());
        pool.rayon = Some(rayon);
        // Wait until every worker runs, so that thread start-up (and its allocations) is over
        // when the pool is handed out.
        while pool.shared.started.load(SeqCst) < n_threads - 1 {
            std::thread::yield_now();
        }
        Ok(pool)
    }

    /// The number of threads loops are spread over.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// The forward passes the generations on this pool have run, and the generation steps
    /// they carried: generations running at once on one pool step together.
    pub fn combined_steps(&self) -> CombinedSteps {
        self.steps.counts()
    }

    /// Runs `f` with the [`Par`] through which kernels split work on this pool. Callers
    /// sharing the pool take turns, first come first served.
    pub fn install<R>(&self, f: impl FnOnce(Par<'_>) -> R) -> R {
        let _turn = self.turns.take();
        f(Par { pool: Some(self) })
    }
    /// Calls `task(i)` for every `i` in `0..n_tasks` on the pool's threads; returns when all
    /// are done. A panic in a task is re-raised here once every thread has let go of the job.
    fn run(&self, n_tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        if self.n_threads == 1 || n_tasks <= 1 {
            (0..n_tasks).for_each(task);
            return;
        }
        let job = Job {
            task,
            n_tasks,
            next: AtomicUsize::new(0),
            remaining: AtomicUsize::new(n_tasks),
            panic: Mutex::new(None),
        };
        let shared = &*self.shared;
        // The pointer is published only until this function has made sure no worker holds it.
        shared
            .job
            .store((&job as *const Job<'_>).cast_mut().cast(), SeqCst);
        shared.epoch.fetch_add(1, SeqCst);
        shared.notify();
        job.work();
        let mut spins = 0u32;
        while job.remaining.load(SeqCst) != 0 || {
            shared.job.store(std::ptr::null_mut(), SeqCst);
            shared.in_job.load(SeqCst) != 0
        } {
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let panic = job.panic.lock().map(|mut p| p.take()).unwrap_or(None);
        if let Some(payload) = panic {
            resume_unwind(payload);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shut_down();
        // Terminates the rayon pool once the workers' loops return; its threads then exit.
        drop(self.rayon.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Permission to run parallel loops on a pool (or sequentially); made by
/// [`ThreadPool::install`] or [`Par::sequential`].
#[derive(Debug, Clone, Copy)]
pub struct Par<'p> {
    pool: Option<&'p ThreadPool>,
}

impl<'p> Par<'p> {
    /// A sequential context (for tests and single-threaded callers).
    pub fn sequential() -> Par<'static> {
        Par { pool: None }
    }

    /// Threads available.
    pub fn n_threads(self) -> usize {
        self.pool.map_or(1, |p| p.n_threads)
    }

    fn run(self, n_tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        match self.pool {
            Some(pool) => pool.run(n_tasks, task),
            None => (0..n_tasks).for_each(task),
        }
    }

    /// Calls `f` on disjoint ranges covering `0..n`, each a multiple of `grain` long (but the
    /// last), in parallel when worthwhile.
    pub fn for_ranges(self, n: usize, grain: usize, f: impl Fn(Range<usize>) + Sync) {
        let grain = grain.max(1);
        let n_chunks = n.div_ceil(grain).min(self.n_threads() * 4);
        if n_chunks <= 1 {
            if n > 0 {
                f(0..n);
            }
            return;
        }
        let per_chunk = n.div_ceil(n_chunks).div_ceil(grain) * grain;
        let n_chunks = n.div_ceil(per_chunk);
        self.run(
            n_chunks,
            &|c| f(c * per_chunk..((c + 1) * per_chunk).min(n)),
        );
    }

    /// Calls `f(row_index, row)` for every `width`-long row of `buf`, in parallel when there
    /// is more than one row (per-token work such as norms and activations).
    pub fn for_rows(self, buf: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
        let width = width.max(1);
        let n_rows = buf.len().div_ceil(width);
        let len = buf.len();
        let rows = DisjointSlice::new(buf);
        self.for_ranges(n_rows, 1, |range| {
            for r in range {
                // SAFETY: each row index is visited by exactly one task.
                f(r, unsafe {
                    rows.range_mut(r * width..((r + 1) * width).min(len))
                });
            }
        });
    }

    /// Calls `f(item, scratch)` for every item of `0..n`, with one slice of `scratch` per task:
    /// `scratch` is cut into pieces of `per_task` elements, and task `c` of `n_tasks` takes
    /// items `c, c + n_tasks, ...` (round-robin, so uneven items spread evenly).
    pub fn for_each_strided_with_scratch<S: Send>(
        self,
        n: usize,
        scratch: &mut [S],
        per_task: usize,
        f: impl Fn(usize, &mut [S]) + Sync,
    ) {
        let per_task = per_task.max(1);
        let n_tasks = (scratch.len() / per_task)
            .min(self.n_threads())
            .min(n)
            .max(1);
        let pieces = DisjointSlice::new(scratch);
        self.run(n_tasks, &|c| {
            // SAFETY: task c alone uses piece c of the scratch.
            let s = unsafe { pieces.range_mut(c * per_task..(c + 1) * per_task) };
            (c..n).step_by(n_tasks).for_each(|item| f(item, s));
        });
    }
}

/// A mutable slice that parallel tasks write disjoint parts of.
///
/// Created from a `&mut [T]`, so nothing else can read or write the slice while it exists;
/// every task must touch only elements no other task touches (the kernels split by output
/// element, which guarantees it).
#[derive(Debug)]
pub(crate) struct DisjointSlice<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: a DisjointSlice is only a pointer to data exclusively borrowed for 'a; sending or
// sharing it across threads is sound as long as tasks write disjoint elements, which is the
// contract of `range_mut` and `write`.
unsafe impl<T: Send> Send for DisjointSlice<'_, T> {}
// SAFETY: see above.
unsafe impl<T: Send> Sync for DisjointSlice<'_, T> {}

impl<'a, T> DisjointSlice<'a, T> {
    /// Wraps an exclusively borrowed slice.
    pub(crate) fn new(slice: &'a mut [T]) -> Self {
        DisjointSlice {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
            _borrow: PhantomData,
        }
    }

    /// The elements `range` of the slice.
    ///
    /// # Safety
    /// No two live results of this call may overlap.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn range_mut(&self, range: Range<usize>) -> &'a mut [T] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "range out of bounds"
        );
        // SAFETY: the range is inside the borrowed slice (asserted above); the caller
        // guarantees no other live reference overlaps it.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.end - range.start)
        }
    }

    /// Writes one element.
    ///
    /// # Safety
    /// No other task may read or write element `index` while the slice is shared.
    #[inline(always)]
    pub(crate) unsafe fn write(&self, index: usize, value: T) {
        assert!(index < self.len, "index out of bounds");
        // SAFETY: `index` is in bounds (asserted) and the caller guarantees it is owned by
        // this task alone.
        unsafe { self.ptr.add(index).write(value) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_task_runs_once_and_panics_propagate() {
        for threads in [1, 2, 3, 8] {
            let pool = ThreadPool::new(threads).unwrap();
            for n in [0, 1, 5, 100, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.install(|par| {
                    par.for_ranges(n, 3, |r| {
                        r.for_each(|i| {
                            hits[i].fetch_add(1, SeqCst);
                        })
                    })
                });
                assert!(
                    hits.iter().all(|h| h.load(SeqCst) == 1),
                    "{threads} threads, n {n}"
                );
            }
            let result = catch_unwind(AssertUnwindSafe(|| {
                pool.install(|par| {
                    par.for_ranges(64, 1, |r| assert!(!r.contains(&40), "task failed"))
                })
            }));
            assert!(result.is_err());
            // The pool still works after a panic.
            let sum = AtomicUsize::new(0);
            pool.install(|par| {
                par.for_ranges(10, 1, |r| {
                    sum.fetch_add(r.len(), SeqCst);
                })
            });
            assert_eq!(sum.load(SeqCst), 10);
        }
    }

    #[test]
    fn workers_sleep_and_wake_and_are_joined() {
        let pool = ThreadPool::new(3).unwrap();
        std::thread::sleep(Duration::from_millis(20)); // past the spin: workers sleep
        let sum = AtomicUsize::new(0);
        pool.install(|par| {
            par.for_ranges(1000, 1, |r| {
                sum.fetch_add(r.len(), SeqCst);
            })
        });
        assert_eq!(sum.load(SeqCst), 1000);
        let shared = pool.shared.clone();
        drop(pool);
        assert_eq!(Arc::strong_count(&shared), 1, "workers still hold the pool");
    }

    #[test]
    fn callers_sharing_a_pool_take_turns_in_order() {
        let pool = ThreadPool::new(2).unwrap();
        let order = Mutex::new(Vec::new());
        let start = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            for who in 0..2 {
                let (pool, order, start) = (&pool, &order, &start);
                s.spawn(move || {
                    start.wait();
                    for _ in 0..20 {
                        pool.install(|_| {
                            order.lock().unwrap().push(who);
                            // Long enough for the other caller to be waiting.
                            std::thread::sleep(Duration::from_millis(2));
                        });
                    }
                });
            }
        });
        let order = order.into_inner().unwrap();
        // Once both wait, a caller that asks again queues behind the other.
        assert!(
            order[1..39].windows(2).all(|w| w[0] != w[1]),
            "turns not taken in order: {order:?}"
        );
    }

    #[test]
    fn rows_and_strided_items_are_disjoint() {
        let pool = ThreadPool::new(4).unwrap();
        let mut buf = vec![0.0f32; 7 * 5];
        pool.install(|par| {
            par.for_rows(&mut buf, 5, |r, row| {
                row.iter_mut().for_each(|v| *v += r as f32)
            })
        });
        assert!(buf
            .chunks(5)
            .enumerate()
            .all(|(r, row)| row.iter().all(|&v| v == r as f32)));
        let mut scratch = vec![0usize; 4 * 2];
        let seen: Vec<AtomicUsize> = (0..23).map(|_| AtomicUsize::new(0)).collect();
        pool.install(|par| {
            par.for_each_strided_with_scratch(23, &mut scratch, 2, |item, s| {
                s[0] += 1;
                seen[item].fetch_add(1, SeqCst);
            })
        });
        assert!(seen.iter().all(|h| h.load(SeqCst) == 1));
        assert_eq!(scratch.iter().step_by(2).sum::<usize>(), 23);
    }

    #[test]
    fn a_worker_woken_for_a_job_that_ended_still_sees_the_shutdown() {
        // The worker wakes for a loop the caller finishes alone, and the pool is dropped
        // before the worker looks at it (as when a loaded machine preempts it there). The
        // drop used to wait forever: the worker then waited for the epoch after shutdown's.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = ThreadPool::new(2).unwrap();
            pool.shared.pause_after_wake.store(true, SeqCst);
            let mut buf = vec![0.0f32; 4];
            // Tasks long enough for the worker to wake during the loop.
            pool.install(|par| {
                par.for_rows(&mut buf, 1, |r, row| {
                    std::thread::sleep(Duration::from_millis(5));
                    row[0] = r as f32
                })
            });
            drop(pool);
            let _ = done.send(buf);
        });
        let buf = finished
            .recv_timeout(Duration::from_secs(20))
            .expect("dropping the pool hangs");
        assert_eq!(buf, [0.0, 1.0, 2.0, 3.0]);
    }
}
