//! Latency histograms as the proxies export them (cumulative `_bucket{le}` counts), their
//! increase over a window, their sum over series, and Prometheus's `histogram_quantile`.

use std::cmp::Ordering;

/// A bucket's upper bound (`le`), ordered (`+Inf` last).
#[derive(Clone, Copy, Debug)]
pub struct Le(pub f64);

impl PartialEq for Le {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Le {}

impl PartialOrd for Le {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Le {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// One histogram series: cumulative counts by upper bound, as scraped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// `(le, cumulative count)`, by `le`; the last is `+Inf` in a complete histogram.
    pub buckets: Vec<(Le, f64)>,
}

impl Histogram {
    /// Adds a scraped bucket (any order).
    pub fn insert(&mut self, le: f64, count: f64) {
        let le = Le(le);
        match self.buckets.binary_search_by(|(b, _)| b.cmp(&le)) {
            Ok(i) => self.buckets[i].1 += count,
            Err(i) => self.buckets.insert(i, (le, count)),
        }
    }

    /// How many observations it holds (its `+Inf` bucket, or its largest).
    pub fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |(_, c)| *c)
    }

    /// Adds another histogram's buckets to these (the sum over series, as `sum by (le)`).
    pub fn add(&mut self, other: &Histogram) {
        for (le, c) in &other.buckets {
            self.insert(le.0, *c);
        }
    }

    /// The increase from `before` to `self` (`increase()` per bucket). A counter that went
    /// down (the proxy restarted) or a different bucket layout counts from zero: all of
    /// `self`.
    pub fn increase_since(&self, before: &Histogram) -> Histogram {
        let same_layout = self.buckets.len() == before.buckets.len()
            && self
                .buckets
                .iter()
                .zip(&before.buckets)
                .all(|((a, ca), (b, cb))| a == b && ca >= cb);
        if !same_layout {
            return self.clone();
        }
        Histogram {
            buckets: self
                .buckets
                .iter()
                .zip(&before.buckets)
                .map(|((le, a), (_, b))| (*le, a - b))
                .collect(),
        }
    }

    /// The `q` quantile (0..=1) as Prometheus's `histogram_quantile` computes it: linear
    /// interpolation within the bucket that holds the rank, from the bucket below's bound (0
    /// for the first); a rank in the `+Inf` bucket is the largest finite bound. None without
    /// observations or without a `+Inf` bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let b = &self.buckets;
        if b.len() < 2 || b.last()?.0.0 != f64::INFINITY || !(0.0..=1.0).contains(&q) {
            return None;
        }
        // Cumulative counts never go down (a race between buckets' increments can make a
        // scrape's look like they do): as Prometheus does, take the running maximum.
        let mut counts = Vec::with_capacity(b.len());
        let mut max = 0.0f64;
        for (_, c) in b {
            max = max.max(*c);
            counts.push(max);
        }
        let total = *counts.last()?;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let i = counts.iter().position(|c| *c >= rank)?;
        if i == b.len() - 1 {
            return Some(b[i - 1].0.0);
        }
        let upper = b[i].0.0;
        if i == 0 && upper <= 0.0 {
            return Some(upper);
        }
        let (lower, below) = if i == 0 {
            (0.0, 0.0)
        } else {
            (b[i - 1].0.0, counts[i - 1])
        };
        let in_bucket = counts[i] - below;
        if in_bucket <= 0.0 {
            return Some(upper);
        }
        Some(lower + (upper - lower) * ((rank - below) / in_bucket))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(buckets: &[(f64, f64)]) -> Histogram {
        let mut h = Histogram::default();
        for (le, c) in buckets {
            h.insert(*le, *c);
        }
        h
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        // 10 observations: 4 under 1 ms, 4 more under 5 ms, 2 more under 10 ms.
        let h = hist(&[
            (f64::INFINITY, 10.0),
            (0.001, 4.0),
            (0.005, 8.0),
            (0.01, 10.0),
        ]);
        assert_eq!(h.count(), 10.0);
        // rank 5: one into the 4 of the (1, 5] ms bucket.
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 - 0.002).abs() < 1e-12, "{p50}");
        // rank 2: half of the first bucket, from 0.
        let p20 = h.quantile(0.2).unwrap();
        assert!((p20 - 0.0005).abs() < 1e-12, "{p20}");
        // rank 9.9: 1.9 of 2 into (5, 10] ms.
        let p99 = h.quantile(0.99).unwrap();
        assert!((p99 - 0.00975).abs() < 1e-12, "{p99}");
    }

    #[test]
    fn the_inf_bucket_answers_with_the_largest_finite_bound() {
        let h = hist(&[(0.1, 1.0), (1.0, 1.0), (f64::INFINITY, 5.0)]);
        assert_eq!(h.quantile(0.9), Some(1.0));
    }

    #[test]
    fn no_observations_no_quantile() {
        assert_eq!(
            hist(&[(0.1, 0.0), (f64::INFINITY, 0.0)]).quantile(0.5),
            None
        );
        assert_eq!(Histogram::default().quantile(0.5), None);
        // Without +Inf it is not a histogram Prometheus would answer for either.
        assert_eq!(hist(&[(0.1, 1.0), (1.0, 2.0)]).quantile(0.5), None);
    }

    #[test]
    fn increase_and_sum() {
        let before = hist(&[(0.1, 1.0), (f64::INFINITY, 2.0)]);
        let after = hist(&[(0.1, 4.0), (f64::INFINITY, 6.0)]);
        let d = after.increase_since(&before);
        assert_eq!(d, hist(&[(0.1, 3.0), (f64::INFINITY, 4.0)]));
        // A restart (counts went down): everything since it.
        let restarted = hist(&[(0.1, 0.0), (f64::INFINITY, 1.0)]);
        assert_eq!(restarted.increase_since(&after), restarted);
        // Nothing before (a new series): all of it.
        assert_eq!(after.increase_since(&Histogram::default()), after);
        let mut sum = d.clone();
        sum.add(&restarted);
        assert_eq!(sum, hist(&[(0.1, 3.0), (f64::INFINITY, 5.0)]));
    }
}
