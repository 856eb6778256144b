//! Keeping the best `n` of many items without sorting them all: for the
//! bounded lists of a `stats` reply over a shard of millions of keys.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// An item ranked by its score alone.
struct Ranked<S, T>(S, T);

impl<S: Ord, T> PartialEq for Ranked<S, T> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<S: Ord, T> Eq for Ranked<S, T> {}

impl<S: Ord, T> PartialOrd for Ranked<S, T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<S: Ord, T> Ord for Ranked<S, T> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.cmp(&other.0)
    }
}

/// The `n` items with the highest `score`, highest first.
pub(crate) fn top<S: Ord, T>(
    items: impl IntoIterator<Item = T>,
    n: usize,
    score: impl Fn(&T) -> S,
) -> Vec<T> {
    if n == 0 {
        // Counters-only callers (metrics) must not pay for a scan.
        return Vec::new();
    }
    let mut kept = BinaryHeap::with_capacity(n + 1);
    for item in items {
        kept.push(Reverse(Ranked(score(&item), item)));
        if kept.len() > n {
            kept.pop();
        }
    }
    let mut best: Vec<Ranked<S, T>> = kept.into_iter().map(|Reverse(r)| r).collect();
    best.sort_by(|a, b| b.cmp(a));
    best.into_iter().map(|Ranked(_, item)| item).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_the_highest_scores_in_order() {
        let best = super::top([5, 1, 9, 3, 7, 9], 3, |&x| x);
        assert_eq!(best, vec![9, 9, 7]);
        assert!(super::top(Vec::<u8>::new(), 3, |&x| x).is_empty());
        assert!(super::top([1, 2], 0, |&x| x).is_empty());
    }

    #[test]
    fn asking_for_none_does_not_look_at_a_single_item() {
        let untouchable = std::iter::from_fn(|| -> Option<u8> { panic!("scanned") });
        assert!(super::top(untouchable, 0, |&x| x).is_empty());
    }
}
