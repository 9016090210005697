//! Approximate percentiles: a logarithmic-bucket sketch (the DDSketch idea) with exact counts.
//!
//! A value `v > 0` lands in bucket `i = ceil(ln v / ln g)` with `g = (1 + a) / (1 - a)`; the
//! bucket's representative `2 g^i / (g + 1)` is within relative error `a` of every value in
//! it. Negative values mirror this; values with `|v| < 1e-9` count as zero. Counts are exact
//! integers, so a sketch can both merge and subtract another: sliding windows keep one sketch
//! per pane and remove whole panes without drift.
//!
//! Guarantee: for sorted values `x_0..x_(n-1)` and quantile `q`, the answer `v` satisfies
//! `|v - x_k| <= a * |x_k|` with `k = floor(q * (n - 1))`, `a = RELATIVE_ACCURACY`.

use serde::{Deserialize, Serialize};

pub const RELATIVE_ACCURACY: f64 = 0.01;
const ZERO_THRESHOLD: f64 = 1e-9;

fn gamma() -> f64 {
    (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY)
}

/// `gamma().ln()`, written out: the logarithm is not computed at compile time, and this is
/// taken once per value added (a test checks the two agree to the bit).
const LN_GAMMA: f64 = 0.020000666706669435;

fn bucket_of(magnitude: f64) -> i32 {
    (magnitude.ln() / LN_GAMMA).ceil() as i32
}

fn representative(bucket: i32) -> f64 {
    let g = gamma();
    let value = 2.0 * g.powi(bucket) / (g + 1.0);
    if value.is_finite() {
        return value;
    }
    // The top buckets (values above about 8.8e307): `g^bucket` overflows although the
    // representative may not. It is the bucket's lower edge `g^(bucket-1)` (below every value
    // in it, so finite) times `1 + a`. Where that passes the largest float, the largest float
    // is nearer every value in the bucket, and so within the bound too.
    (g.powi(bucket - 1) * (1.0 + RELATIVE_ACCURACY)).min(f64::MAX)
}

/// Sorted `(bucket, count)` pairs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Buckets(Vec<(i32, u32)>);

impl Buckets {
    fn add(&mut self, bucket: i32, count: u32) {
        match self.0.binary_search_by_key(&bucket, |(b, _)| *b) {
            Ok(i) => self.0[i].1 += count,
            Err(i) => {
                super::prefetch::reserve_one(&mut self.0);
                self.0.insert(i, (bucket, count))
            }
        }
    }

    /// Removes `count` from a bucket; false when the bucket does not hold that many.
    fn remove(&mut self, bucket: i32, count: u32) -> bool {
        match self.0.binary_search_by_key(&bucket, |(b, _)| *b) {
            Ok(i) if self.0[i].1 >= count => {
                self.0[i].1 -= count;
                if self.0[i].1 == 0 {
                    self.0.remove(i);
                }
                true
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sketch {
    positive: Buckets,
    negative: Buckets,
    zeros: u64,
    count: u64,
}

impl Sketch {
    pub fn add(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        if value.abs() < ZERO_THRESHOLD {
            self.zeros += 1;
        } else if value > 0.0 {
            self.positive.add(bucket_of(value), 1);
        } else {
            self.negative.add(bucket_of(-value), 1);
        }
        self.count += 1;
    }

    pub fn merge(&mut self, other: &Sketch) {
        for &(b, c) in &other.positive.0 {
            self.positive.add(b, c);
        }
        for &(b, c) in &other.negative.0 {
            self.negative.add(b, c);
        }
        self.zeros += other.zeros;
        self.count += other.count;
    }

    /// Removes a sketch that was merged in earlier. False if `other` was not part of `self`
    /// (the caller then rebuilds).
    pub fn subtract(&mut self, other: &Sketch) -> bool {
        if other.count > self.count || other.zeros > self.zeros {
            return false;
        }
        for &(b, c) in &other.positive.0 {
            if !self.positive.remove(b, c) {
                return false;
            }
        }
        for &(b, c) in &other.negative.0 {
            if !self.negative.remove(b, c) {
                return false;
            }
        }
        self.zeros -= other.zeros;
        self.count -= other.count;
        true
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The approximate `q`-quantile (see the module note for the bound), `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * (self.count - 1) as f64).floor() as u64;
        // High quantiles of positive data are found faster from the top.
        let above = self.count - 1 - rank;
        if self.negative.0.is_empty() && above < self.count / 2 {
            let mut seen = 0u64;
            for &(b, c) in self.positive.0.iter().rev() {
                seen += u64::from(c);
                if seen > above {
                    return Some(representative(b));
                }
            }
            return Some(0.0);
        }
        let mut seen = 0u64;
        // Most negative first: negative buckets from the largest magnitude down.
        for &(b, c) in self.negative.0.iter().rev() {
            seen += u64::from(c);
            if seen > rank {
                return Some(-representative(b));
            }
        }
        seen += self.zeros;
        if seen > rank {
            return Some(0.0);
        }
        for &(b, c) in &self.positive.0 {
            seen += u64::from(c);
            if seen > rank {
                return Some(representative(b));
            }
        }
        self.positive.0.last().map(|&(b, _)| representative(b))
    }

    /// Starts loading the positive buckets, where most values land.
    pub fn prefetch(&self) {
        super::prefetch::prefetch(self.positive.0.as_ptr());
    }

    pub fn heap_bytes(&self) -> usize {
        (self.positive.0.capacity() + self.negative.0.capacity())
            * std::mem::size_of::<(i32, u32)>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact(values: &mut [f64], q: f64) -> f64 {
        values.sort_by(|a, b| a.total_cmp(b));
        values[(q * (values.len() - 1) as f64).floor() as usize]
    }

    proptest! {
        #[test]
        fn quantiles_are_within_the_documented_bound(
            values in prop::collection::vec(
                prop_oneof![-1e6f64..1e6, 0.001f64..10.0, Just(0.0), 1e300f64..f64::MAX, -f64::MAX..-1e300],
                1..400,
            ),
            q in 0.0f64..=1.0,
        ) {
            let mut sketch = Sketch::default();
            for v in &values { sketch.add(*v); }
            let got = sketch.quantile(q).unwrap();
            let mut sorted = values.clone();
            let want = exact(&mut sorted, q);
            let tolerance = RELATIVE_ACCURACY * want.abs() + ZERO_THRESHOLD;
            prop_assert!((got - want).abs() <= tolerance, "q={q} got={got} want={want}");
        }

        #[test]
        fn quantiles_of_non_negative_data_are_within_the_bound(
            values in prop::collection::vec(prop_oneof![0.01f64..1e5, Just(0.0)], 1..400),
            q in 0.0f64..=1.0,
        ) {
            let mut sketch = Sketch::default();
            for v in &values { sketch.add(*v); }
            let got = sketch.quantile(q).unwrap();
            let mut sorted = values.clone();
            let want = exact(&mut sorted, q);
            prop_assert!((got - want).abs() <= RELATIVE_ACCURACY * want.abs() + ZERO_THRESHOLD, "q={q} got={got} want={want}");
        }

        #[test]
        fn subtracting_a_merged_part_restores_the_rest(
            a in prop::collection::vec(-1e3f64..1e3, 0..100),
            b in prop::collection::vec(-1e3f64..1e3, 0..100),
        ) {
            let (mut sa, mut sb) = (Sketch::default(), Sketch::default());
            for v in &a { sa.add(*v); }
            for v in &b { sb.add(*v); }
            let mut both = sa.clone();
            both.merge(&sb);
            prop_assert!(both.subtract(&sb));
            prop_assert_eq!(both, sa);
        }
    }

    #[test]
    fn the_written_out_logarithm_is_the_computed_one() {
        assert_eq!(LN_GAMMA.to_bits(), gamma().ln().to_bits());
    }

    #[test]
    fn the_largest_floats_have_quantiles_within_the_bound() {
        let values = [8e307, 8.8e307, 9e307, 1e308, 1.7e308, f64::MAX];
        for v in values.into_iter().flat_map(|v| [v, -v]) {
            let mut sketch = Sketch::default();
            sketch.add(v);
            let got = sketch.quantile(0.5).unwrap();
            assert!(
                (got - v).abs() <= RELATIVE_ACCURACY * v.abs(),
                "value {v}: got {got}"
            );
        }
        let mut sketch = Sketch::default();
        for v in [1.0, 2.0, 3.0, 1e308] {
            sketch.add(v);
        }
        let top = sketch.quantile(1.0).unwrap();
        assert!((top - 1e308).abs() <= RELATIVE_ACCURACY * 1e308, "{top}");
    }

    #[test]
    fn empty_sketch_has_no_quantile() {
        assert_eq!(Sketch::default().quantile(0.5), None);
        let mut other = Sketch::default();
        other.add(1.0);
        assert!(!Sketch::default().subtract(&other));
    }
}
