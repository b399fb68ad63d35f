//! The engine's thread pool: quantized matmuls split their rows over it, candle's dense
//! matmuls (gemm) use it too, and every forward step runs on one of its workers.
//!
//! Its size is set once: [`set_threads`] before the first forward, else
//! `$LOCKSTEP_THREADS`, else `$RAYON_NUM_THREADS`, else the number of CPUs.

use std::sync::OnceLock;

use rayon::{ThreadPool, ThreadPoolBuilder};

static POOL: OnceLock<ThreadPool> = OnceLock::new();

fn default_threads() -> usize {
    ["LOCKSTEP_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0))
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn build(n: usize) -> ThreadPool {
    ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("lockstep-engine-{i}"))
        .build()
        .expect("the engine thread pool starts")
}

/// The pool, created on first use.
pub fn pool() -> &'static ThreadPool {
    POOL.get_or_init(|| build(default_threads()))
}

/// Sizes the pool; false when it already exists with another size.
pub fn set_threads(n: usize) -> bool {
    let n = n.max(1);
    POOL.get_or_init(|| build(n)).current_num_threads() == n
}
