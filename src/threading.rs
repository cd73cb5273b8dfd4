//! A private, caller-sized thread pool and the parallel loops the kernels use.
//!
//! Ember never touches rayon's global pool: a host application decides how many cores
//! inference may use. The pool is entered once per step ([`ThreadPool::install`]); inside, the
//! kernels split work with [`Par`]. Work is split by output element, each element computed
//! by one thread in a fixed order, so results do not depend on the thread count.

use std::marker::PhantomData;
use std::ops::Range;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// A pool of worker threads owned by Ember. With one thread no worker is created and all
/// work runs on the calling thread.
#[derive(Debug)]
pub struct ThreadPool {
    pool: Option<rayon::ThreadPool>,
    n_threads: usize,
}

impl ThreadPool {
    /// Creates a pool of `n_threads` threads (the calling thread counts as one of them when
    /// `n_threads == 1`). Idle workers sleep rather than spin.
    pub fn new(n_threads: usize) -> Result<ThreadPool> {
        if n_threads == 0 || n_threads > 1024 {
            return Err(Error::InvalidArgument(format!(
                "thread count {n_threads} (must be 1..=1024)"
            )));
        }
        let pool = if n_threads == 1 {
            None
        } else {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n_threads)
                .thread_name(|i| format!("ember-worker-{i}"))
                .build()
                .map_err(|e| Error::Internal(format!("could not start worker threads: {e}")))?;
            Some(pool)
        };
        Ok(ThreadPool { pool, n_threads })
    }

    /// The number of threads work is spread over.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f` inside the pool, handing it the [`Par`] through which kernels split work.
    pub fn install<R: Send>(&self, f: impl FnOnce(Par) -> R + Send) -> R {
        match &self.pool {
            None => f(Par { n_threads: 1 }),
            Some(pool) => pool.install(|| {
                f(Par {
                    n_threads: self.n_threads,
                })
            }),
        }
    }
}

/// Permission to run parallel loops; only [`ThreadPool::install`] makes one, so parallel work
/// always lands on Ember's own pool.
#[derive(Debug, Clone, Copy)]
pub struct Par {
    n_threads: usize,
}

impl Par {
    /// A sequential context (for tests and single-threaded callers).
    pub fn sequential() -> Par {
        Par { n_threads: 1 }
    }

    /// Threads available.
    pub fn n_threads(self) -> usize {
        self.n_threads
    }

    /// Calls `f` on disjoint ranges covering `0..n`, each at least `grain` long (but the last),
    /// in parallel when worthwhile.
    pub fn for_ranges(self, n: usize, grain: usize, f: impl Fn(Range<usize>) + Sync + Send) {
        let grain = grain.max(1);
        let n_chunks = n.div_ceil(grain).min(self.n_threads * 4);
        if self.n_threads == 1 || n_chunks <= 1 {
            if n > 0 {
                f(0..n);
            }
            return;
        }
        let per_chunk = n.div_ceil(n_chunks);
        // Round chunks up to a multiple of the grain so tiles stay whole.
        let per_chunk = per_chunk.div_ceil(grain) * grain;
        let n_chunks = n.div_ceil(per_chunk);
        (0..n_chunks)
            .into_par_iter()
            .for_each(|c| f(c * per_chunk..((c + 1) * per_chunk).min(n)));
    }

    /// Calls `f(row_index, row)` for every `width`-long row of `buf`, in parallel when there
    /// is more than one row (per-token work such as norms and activations).
    pub fn for_rows(
        self,
        buf: &mut [f32],
        width: usize,
        f: impl Fn(usize, &mut [f32]) + Sync + Send,
    ) {
        let width = width.max(1);
        if self.n_threads == 1 || buf.len() <= width {
            buf.chunks_mut(width)
                .enumerate()
                .for_each(|(i, row)| f(i, row));
        } else {
            buf.par_chunks_mut(width)
                .enumerate()
                .for_each(|(i, row)| f(i, row));
        }
    }

    /// Calls `f(item, scratch)` for every item of `0..n`, with one slice of `scratch` per task:
    /// `scratch` is cut into pieces of `per_task` elements, and task `c` of `n_tasks` takes
    /// items `c, c + n_tasks, ...` (round-robin, so uneven items spread evenly).
    pub fn for_each_strided_with_scratch<S: Send>(
        self,
        n: usize,
        scratch: &mut [S],
        per_task: usize,
        f: impl Fn(usize, &mut [S]) + Sync + Send,
    ) {
        let n_tasks = (scratch.len() / per_task.max(1))
            .min(self.n_threads)
            .min(n)
            .max(1);
        if n_tasks == 1 {
            (0..n).for_each(|item| f(item, &mut scratch[..per_task]));
            return;
        }
        scratch
            .par_chunks_mut(per_task)
            .take(n_tasks)
            .enumerate()
            .for_each(|(c, s)| (c..n).step_by(n_tasks).for_each(|item| f(item, s)));
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
// contract of `range_mut`.
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
        // SAFETY: `index` is in bounds (asserted) and the caller guarantees it is owned by this task alone.
        unsafe { self.ptr.add(index).write(value) }
    }
}
