//! A decode step allocates nothing: the KV cache and every buffer are made with the session.
//!
//! This test has no libtest harness (`harness = false`): only the session's own threads run
//! while allocations are counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ember::{KvType, Model, Session, SessionOptions};

/// The system allocator, counting allocations made by any thread.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() {
    decode_steps_do_not_allocate();
    println!("no_alloc: decode steps allocate nothing (F32 llama, qwen2, gpt2; Q4_1, Q8_0 llama; f32 and f16 caches)");
}

fn decode_steps_do_not_allocate() {
    for (name, threads, kv_type) in [
        ("llama", 1, KvType::F32),
        ("llama", 2, KvType::F16),
        ("qwen2", 2, KvType::F32),
        ("gpt2", 2, KvType::F32),
        ("gguf/llama.Q4_1.gguf", 2, KvType::F16),
        ("gguf/llama.Q8_0.gguf", 1, KvType::F32),
    ] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let model = Arc::new(Model::load(dir).unwrap());
        let mut session = Session::new(
            model,
            &SessionOptions {
                n_ctx: 64,
                n_threads: threads,
                ubatch: 16,
                kv_type,
            },
        )
        .unwrap();
        session.step(&[1, 2, 3, 4, 5]).unwrap();
        session.step(&[6]).unwrap(); // warm-up: the pool's threads are started
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        for t in 0..20 {
            session.step(&[t]).unwrap();
        }
        let allocated = ALLOCATIONS.load(Ordering::SeqCst) - before;
        assert_eq!(
            allocated, 0,
            "{name} with {threads} threads, {kv_type:?} cache: {allocated} allocations in 20 decode steps"
        );
    }
}
