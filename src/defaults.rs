//! The defaults and limits every front end shares (the C API, the CLI, the bindings): one
//! place for each policy.

/// Context length used when a caller asks for 0 ("the default"): the model's trained context,
/// capped here because the KV cache is allocated up front.
pub const CONTEXT_CAP: usize = 2048;

/// Prompt tokens processed per micro-batch.
pub const UBATCH: usize = 64;

/// The largest micro-batch a session accepts.
pub const MAX_UBATCH: usize = 4096;

/// How long a generation's next forward pass waits for the other sessions generating on its
/// thread pool to come back from sampling, so that they share the pass
/// (`crate::session::together`). Sampling takes well under this; a session that stops
/// generating is not waited for, nor one its host has paused past one such wait.
pub const STEP_GATHER: std::time::Duration = std::time::Duration::from_millis(1);

/// The most sessions one batched step takes (`Session::step_batch`, `ember_step_batch`).
pub const MAX_BATCH: usize = 256;

/// The most alternatives a generated token can carry with its log-probability
/// (`top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The machine's hardware threads (1 if unknown).
pub fn machine_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The thread count a session gets when `requested` threads are asked for through the C API
/// or the CLI: 0 means half the machine's threads (at least 1), so a host keeps cores for
/// itself; a count above the machine's threads is clamped to them (more threads than cores
/// only slow inference down, and each costs the host an OS thread).
pub fn threads(requested: usize) -> usize {
    let machine = machine_threads();
    match requested {
        0 => (machine / 2).max(1),
        n => n.min(machine),
    }
}

/// The context length a session gets for `requested` (0 = the default) on a model trained
/// for `trained` positions. A request above `trained` is passed on (and refused by the
/// session).
pub fn context(requested: usize, trained: usize) -> usize {
    match requested {
        0 => trained.min(CONTEXT_CAP),
        n => n,
    }
}
