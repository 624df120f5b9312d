//! The evolver's own data parallelism: per-generation work (validating an
//! ES generation's pairs, the ES update) split over this process's cores.
//! Every item is computed by the same code whatever thread runs it, and the
//! results are put back by index, so they never depend on the number of
//! threads or on scheduling.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Below this many values of work in all, one thread does it (starting
/// threads costs more than it saves).
const MIN_PARALLEL_WORK: usize = 1 << 18;

/// Threads for `work` values of work: the cores available, at most one per
/// item, one for small jobs.
pub(crate) fn threads_for(items: usize, work: usize) -> usize {
    if work < MIN_PARALLEL_WORK {
        return 1;
    }
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(items)
        .max(1)
}

/// `(0..count).map(f)`, computed on up to `threads` threads (items taken in
/// turn from a shared counter), in index order.
pub(crate) fn map<T: Send>(count: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    if threads <= 1 || count <= 1 {
        return (0..count).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut parts: Vec<Vec<(usize, T)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.min(count))
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        // Relaxed: the counter only hands out distinct
                        // indices; the results travel through `join`.
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return out;
                        }
                        out.push((i, f(i)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let mut all: Vec<(usize, T)> = parts.drain(..).flatten().collect();
    all.sort_unstable_by_key(|&(i, _)| i);
    all.into_iter().map(|(_, t)| t).collect()
}

/// `f(i, item)` for every item (owned, e.g. disjoint `&mut` slices of one
/// buffer), on up to `threads` threads, each taking a contiguous run of
/// items.
pub(crate) fn for_each<T: Send>(items: Vec<T>, threads: usize, f: impl Fn(usize, T) + Sync) {
    if threads <= 1 || items.len() <= 1 {
        for (i, t) in items.into_iter().enumerate() {
            f(i, t);
        }
        return;
    }
    let per = items.len().div_ceil(threads);
    let mut runs: Vec<Vec<(usize, T)>> = Vec::new();
    for (i, t) in items.into_iter().enumerate() {
        if i % per == 0 {
            runs.push(Vec::with_capacity(per));
        }
        runs.last_mut().expect("pushed above").push((i, t));
    }
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = runs
            .into_iter()
            .map(|run| {
                s.spawn(move || {
                    for (i, t) in run {
                        f(i, t);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_is_in_order_whatever_the_threads() {
        let want: Vec<u64> = (0..100u64).map(|i| i * i).collect();
        for threads in [1, 2, 3, 8] {
            assert_eq!(map(100, threads, |i| (i as u64) * (i as u64)), want);
        }
        assert!(map(0, 4, |i| i).is_empty());
    }

    #[test]
    fn for_each_visits_every_item_once_with_its_index() {
        for threads in [1, 2, 3, 8] {
            let mut out = vec![0usize; 37];
            let items: Vec<&mut [usize]> = out.chunks_mut(4).collect();
            for_each(items, threads, |i, chunk| {
                for (k, x) in chunk.iter_mut().enumerate() {
                    *x += 1000 * i + k + 1;
                }
            });
            let want: Vec<usize> = (0..37).map(|j| 1000 * (j / 4) + j % 4 + 1).collect();
            assert_eq!(out, want, "{threads} threads");
        }
    }
}
