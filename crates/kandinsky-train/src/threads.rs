//! Threads of the training stages, in one place: the stage's own threads ([`on_threads`]) and
//! the kernel libraries' pools ([`one_kernel_thread`]). See docs/small-model.md for the step
//! times behind these choices.

/// Runs `f(0)` on this thread and `f(1)`, …, `f(n − 1)` on threads of their own, and returns
/// the results in that order (a panic in a thread is raised again here).
pub fn on_threads<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (1..n).map(|i| s.spawn(move || f(i))).collect();
        let mut out = vec![f(0)];
        for h in handles {
            out.push(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        }
        out
    })
}

/// `f(0)`, …, `f(n − 1)` shared round-robin over `threads` threads ([`on_threads`]; item `i` on
/// thread `i % threads`), in index order. Each thread stops at its first error; the error of
/// the lowest-numbered failing thread is returned.
pub fn try_map_on_threads<T: Send, E: Send>(
    threads: usize,
    n: usize,
    f: impl Fn(usize) -> Result<T, E> + Sync,
) -> Result<Vec<T>, E> {
    let t = threads.max(1);
    let mut per_thread = on_threads(t, |w| {
        (w..n).step_by(t).map(&f).collect::<Result<Vec<_>, E>>()
    })
    .into_iter()
    .map(|r| r.map(Vec::into_iter))
    .collect::<Result<Vec<_>, E>>()?;
    Ok((0..n)
        .map(|i| {
            per_thread[i % t]
                .next()
                .expect("thread i % t computed item i")
        })
        .collect())
}

/// Sets `CANDLE_NUM_THREADS` and `RAYON_NUM_THREADS` to 1 where they are unset, for stages that
/// run their own threads: candle's spinning elementwise workers and rayon's matmul workers would
/// only compete with them for the cores (the weights are the same bits either way).
///
/// # Safety
/// Call it before any other thread exists (first thing in `main`): it changes the environment,
/// which candle and rayon read when they build their pools, on first use.
pub unsafe fn one_kernel_thread() {
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            // SAFETY: the caller guarantees that no other thread exists yet.
            unsafe { std::env::set_var(var, "1") };
        }
    }
}
