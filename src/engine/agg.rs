//! Accumulators: the partial state of one aggregation over a set of events.
//!
//! Every accumulator can `add` a value and `merge` another; windows keep one per pane and one
//! running total. `subtract` removes a pane from the running total exactly when the aggregate
//! allows it (integer counts, sketches, compensated float sums); min, max, first and last say
//! when they cannot, and the window rebuilds its total from its panes.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::sketch::Sketch;
use crate::config::{Agg, ValueType};
use crate::decode::Value;

/// A feature's value in a record, a snapshot row or a look-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub enum FeatureValue {
    #[default]
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(Box<str>),
    /// Epoch milliseconds.
    Ts(i64),
}

impl FeatureValue {
    fn from_value(value: &Value<'_>) -> FeatureValue {
        match value {
            Value::Null => FeatureValue::Null,
            Value::Str(s) => FeatureValue::Str(s.as_ref().into()),
            Value::Int(i) => FeatureValue::Int(*i),
            Value::Float(f) => FeatureValue::Float(*f),
            Value::Bool(b) => FeatureValue::Bool(*b),
            Value::Ts(t) => FeatureValue::Ts(*t),
        }
    }

    fn float(value: f64) -> FeatureValue {
        if value.is_finite() {
            FeatureValue::Float(value)
        } else {
            FeatureValue::Null
        }
    }

    pub fn hash_into<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            FeatureValue::Null => {}
            FeatureValue::Int(i) | FeatureValue::Ts(i) => i.hash(state),
            FeatureValue::Float(f) => f.to_bits().hash(state),
            FeatureValue::Bool(b) => b.hash(state),
            FeatureValue::Str(s) => s.hash(state),
        }
    }

    pub fn heap_bytes(&self) -> usize {
        match self {
            FeatureValue::Str(s) => s.len(),
            _ => 0,
        }
    }
}

/// One event's contribution: the field value (Null for a field-less count), time and arrival.
pub struct Input<'v, 'a> {
    pub value: &'v Value<'a>,
    pub time: i64,
    pub seq: u64,
}

/// What one pane of a window keeps. Most aggregations keep their whole accumulator per pane;
/// sums and moments keep plain sums (a pane holds few events), and the window's running total
/// keeps the compensated ones.
pub trait Part:
    std::fmt::Debug + Clone + Default + Serialize + for<'de> Deserialize<'de> + Send + Sync + 'static
{
    fn add(&mut self, input: &Input<'_, '_>);
    fn is_empty(&self) -> bool;
    fn heap_bytes(&self) -> usize {
        0
    }
}

/// An accumulator is its own pane part: `whole_panes!([generics] Type, ...)`.
macro_rules! whole_panes {
    ($([$($generics:tt)*] $t:ty),* $(,)?) => {
        $(
            impl<$($generics)*> Part for $t {
                fn add(&mut self, input: &Input<'_, '_>) {
                    Accumulator::add(self, input)
                }
                fn is_empty(&self) -> bool {
                    Accumulator::is_empty(self)
                }
                fn heap_bytes(&self) -> usize {
                    Accumulator::heap_bytes(self)
                }
            }
        )*
    };
}

pub trait Accumulator:
    std::fmt::Debug + Clone + Default + Serialize + for<'de> Deserialize<'de> + Send + Sync + 'static
{
    /// What a window's pane keeps for this aggregation.
    type Part: Part;
    /// Adds a pane's part into this total.
    fn merge_part(&mut self, part: &Self::Part);
    /// Removes a pane's part merged in earlier; false when the caller must rebuild.
    fn subtract_part(&mut self, part: &Self::Part) -> bool;
    fn add(&mut self, input: &Input<'_, '_>);
    fn merge(&mut self, other: &Self);
    /// Removes `other`, which was merged in earlier; false when this aggregate cannot and the
    /// caller must rebuild from parts.
    fn subtract(&mut self, other: &Self) -> bool;
    fn is_empty(&self) -> bool;
    fn output(&self, agg: Agg, ty: ValueType) -> FeatureValue;
    fn heap_bytes(&self) -> usize {
        0
    }
    /// Starts loading what this accumulator keeps on the heap (see `prefetch`).
    fn prefetch(&self) {}
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CountAcc(pub u64);

impl Accumulator for CountAcc {
    type Part = Self;
    fn merge_part(&mut self, part: &Self) {
        self.merge(part);
    }
    fn subtract_part(&mut self, part: &Self) -> bool {
        self.subtract(part)
    }
    fn add(&mut self, _: &Input<'_, '_>) {
        self.0 += 1;
    }
    fn merge(&mut self, other: &Self) {
        self.0 += other.0;
    }
    fn subtract(&mut self, other: &Self) -> bool {
        self.0 = self.0.saturating_sub(other.0);
        true
    }
    fn is_empty(&self) -> bool {
        self.0 == 0
    }
    fn output(&self, _: Agg, _: ValueType) -> FeatureValue {
        FeatureValue::Int(self.0 as i64)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SumIntAcc {
    sum: i128,
    n: u64,
}

impl Accumulator for SumIntAcc {
    type Part = Self;
    fn merge_part(&mut self, part: &Self) {
        self.merge(part);
    }
    fn subtract_part(&mut self, part: &Self) -> bool {
        self.subtract(part)
    }
    fn add(&mut self, input: &Input<'_, '_>) {
        if let Value::Int(i) = input.value {
            self.sum += i128::from(*i);
            self.n += 1;
        }
    }
    fn merge(&mut self, other: &Self) {
        self.sum += other.sum;
        self.n += other.n;
    }
    fn subtract(&mut self, other: &Self) -> bool {
        self.sum -= other.sum;
        self.n = self.n.saturating_sub(other.n);
        true
    }
    fn is_empty(&self) -> bool {
        self.n == 0
    }
    fn output(&self, _: Agg, _: ValueType) -> FeatureValue {
        if self.n == 0 {
            return FeatureValue::Null;
        }
        i64::try_from(self.sum).map_or(FeatureValue::Null, FeatureValue::Int)
    }
}

/// A running total that values are added to and subtracted from is only as exact as the largest
/// values that passed through it: each was rounded on the way. Once the magnitude that passed
/// through is this many times what the total now holds (a 1e8 has left a window of 0.1s), the
/// total is rebuilt from the panes that remain, which bounds the relative error near 2e-10.
const CANCELLATION: f64 = (1u64 << 20) as f64;

/// A float sum with Neumaier compensation, so that adding and later subtracting the same
/// values returns to (almost exactly) where it was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CompensatedSum {
    sum: f64,
    compensation: f64,
}

impl CompensatedSum {
    fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if self.sum.abs() >= x.abs() {
            self.compensation += (self.sum - t) + x;
        } else {
            self.compensation += (x - t) + self.sum;
        }
        self.sum = t;
    }

    fn add_sum(&mut self, other: &CompensatedSum, sign: f64) {
        self.add(sign * other.sum);
        self.add(sign * other.compensation);
    }

    fn value(&self) -> f64 {
        self.sum + self.compensation
    }
}

whole_panes!(
    [] CountAcc,
    [] SumIntAcc,
    [] DistinctAcc,
    [const MAX: bool] ExtremeAcc<MAX>,
    [const LAST: bool] EdgeAcc<LAST>,
);

/// A pane of a float sum: the plain sum of its values and their count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SumFloatPart {
    sum: f64,
    n: u64,
}

impl Part for SumFloatPart {
    fn add(&mut self, input: &Input<'_, '_>) {
        if let Some(x) = input.value.as_f64() {
            self.sum += x;
            self.n += 1;
        }
    }
    fn is_empty(&self) -> bool {
        self.n == 0
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SumFloatAcc {
    sum: CompensatedSum,
    n: u64,
    /// Magnitude added and subtracted since the total was last built from scratch (see
    /// [`CANCELLATION`]). Stored, so that a restored total rebuilds exactly when the original
    /// would have.
    passed: f64,
}

impl Accumulator for SumFloatAcc {
    type Part = SumFloatPart;
    fn merge_part(&mut self, part: &SumFloatPart) {
        self.sum.add(part.sum);
        self.n += part.n;
        self.passed += part.sum.abs();
    }
    fn subtract_part(&mut self, part: &SumFloatPart) -> bool {
        self.n = self.n.saturating_sub(part.n);
        if self.n == 0 {
            *self = Self::default();
            return true;
        }
        self.sum.add(-part.sum);
        self.passed += part.sum.abs();
        self.passed <= CANCELLATION * self.sum.value().abs()
    }
    fn add(&mut self, input: &Input<'_, '_>) {
        if let Some(x) = input.value.as_f64() {
            self.sum.add(x);
            self.n += 1;
            self.passed += x.abs();
        }
    }
    fn merge(&mut self, other: &Self) {
        self.sum.add_sum(&other.sum, 1.0);
        self.n += other.n;
        self.passed += other.passed;
    }
    fn subtract(&mut self, other: &Self) -> bool {
        self.n = self.n.saturating_sub(other.n);
        if self.n == 0 {
            *self = Self::default();
            return true;
        }
        self.sum.add_sum(&other.sum, -1.0);
        self.passed += other.passed;
        self.passed <= CANCELLATION * self.sum.value().abs()
    }
    fn is_empty(&self) -> bool {
        self.n == 0
    }
    fn output(&self, _: Agg, _: ValueType) -> FeatureValue {
        if self.n == 0 {
            FeatureValue::Null
        } else {
            FeatureValue::float(self.sum.value())
        }
    }
}

/// Count, sum and sum of squares of `x - shift`, where `shift` is the first value seen: shifting
/// by a value near the data keeps the variance formula free of catastrophic cancellation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MomentsAcc {
    n: u64,
    shift: f64,
    s1: CompensatedSum,
    s2: CompensatedSum,
    /// Squares added and subtracted since the sums were last built from scratch (see
    /// [`CANCELLATION`]). Stored, like [`SumFloatAcc::passed`].
    passed: f64,
}

/// A pane of a moments window: count and plain sums of `x - shift` around the pane's first
/// value (32 bytes, against 48 for the compensated accumulator).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MomentsPart {
    n: u64,
    shift: f64,
    s1: f64,
    s2: f64,
}

impl Part for MomentsPart {
    fn add(&mut self, input: &Input<'_, '_>) {
        let Some(x) = input.value.as_f64() else {
            return;
        };
        if self.n == 0 {
            self.shift = x;
        }
        let d = x - self.shift;
        self.s1 += d;
        self.s2 += d * d;
        self.n += 1;
    }
    fn is_empty(&self) -> bool {
        self.n == 0
    }
}

impl MomentsPart {
    fn as_acc(&self) -> MomentsAcc {
        let mut acc = MomentsAcc {
            n: self.n,
            shift: self.shift,
            ..Default::default()
        };
        acc.s1.add(self.s1);
        acc.s2.add(self.s2);
        acc.passed = self.s2;
        acc
    }
}

impl MomentsAcc {
    /// `other`'s sums re-expressed around `self.shift`.
    fn rebased(&self, other: &MomentsAcc) -> (CompensatedSum, CompensatedSum) {
        let d = other.shift - self.shift;
        let n = other.n as f64;
        let s1 = other.s1.value();
        let mut r1 = other.s1;
        r1.add(n * d);
        let mut r2 = other.s2;
        r2.add(2.0 * d * s1 + n * d * d);
        (r1, r2)
    }

    fn mean(&self) -> f64 {
        self.shift + self.s1.value() / self.n as f64
    }

    /// Sum of squared deviations from the mean; NaN when the sums overflowed (`f64::max`
    /// would turn that NaN into 0, a wrong spread instead of null).
    fn m2(&self) -> f64 {
        let s1 = self.s1.value();
        let m2 = self.s2.value() - s1 * s1 / self.n as f64;
        if m2.is_nan() { m2 } else { m2.max(0.0) }
    }
}

impl Accumulator for MomentsAcc {
    type Part = MomentsPart;
    fn merge_part(&mut self, part: &MomentsPart) {
        self.merge(&part.as_acc());
    }
    fn subtract_part(&mut self, part: &MomentsPart) -> bool {
        self.subtract(&part.as_acc())
    }
    fn add(&mut self, input: &Input<'_, '_>) {
        let Some(x) = input.value.as_f64() else {
            return;
        };
        if self.n == 0 {
            *self = MomentsAcc {
                shift: x,
                ..Default::default()
            };
        }
        let d = x - self.shift;
        self.s1.add(d);
        self.s2.add(d * d);
        self.n += 1;
        self.passed += d * d;
    }
    fn merge(&mut self, other: &Self) {
        if other.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = *other;
            return;
        }
        let (r1, r2) = self.rebased(other);
        self.s1.add_sum(&r1, 1.0);
        self.s2.add_sum(&r2, 1.0);
        self.n += other.n;
        self.passed += r2.value().abs();
    }
    fn subtract(&mut self, other: &Self) -> bool {
        if other.n == 0 {
            return true;
        }
        if other.n >= self.n {
            *self = Self::default();
            return true;
        }
        let (r1, r2) = self.rebased(other);
        self.s1.add_sum(&r1, -1.0);
        self.s2.add_sum(&r2, -1.0);
        self.n -= other.n;
        self.passed += r2.value().abs();
        // The sums are around `shift`, the first value merged: once the values near it have
        // left, the spread is a small difference of large squares. Rebuilding starts again
        // around a value still in the window.
        let m2 = CANCELLATION * self.m2();
        self.passed <= m2 && self.s2.value() <= m2
    }
    fn is_empty(&self) -> bool {
        self.n == 0
    }
    fn output(&self, agg: Agg, _: ValueType) -> FeatureValue {
        let n = self.n as f64;
        let value = match agg {
            Agg::Mean if self.n >= 1 => self.mean(),
            Agg::Variance if self.n >= 2 => self.m2() / (n - 1.0),
            Agg::Stddev if self.n >= 2 => (self.m2() / (n - 1.0)).sqrt(),
            Agg::VariancePop if self.n >= 1 => self.m2() / n,
            Agg::StddevPop if self.n >= 1 => (self.m2() / n).sqrt(),
            _ => return FeatureValue::Null,
        };
        FeatureValue::float(value)
    }
}

/// A number kept in its own type, so `min`/`max` of an int field stay exact ints.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn of(value: &Value<'_>) -> Option<Num> {
        match value {
            Value::Int(i) | Value::Ts(i) => Some(Num::Int(*i)),
            Value::Float(f) => Some(Num::Float(*f)),
            _ => None,
        }
    }

    fn less(self, other: Num) -> bool {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => a < b,
            (a, b) => a.as_f64() < b.as_f64(),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }
}

/// `min` (`MAX = false`) or `max` (`MAX = true`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ExtremeAcc<const MAX: bool> {
    best: Option<Num>,
}

impl<const MAX: bool> ExtremeAcc<MAX> {
    fn better(candidate: Num, current: Num) -> bool {
        if MAX {
            current.less(candidate)
        } else {
            candidate.less(current)
        }
    }

    fn offer(&mut self, candidate: Num) {
        match self.best {
            Some(current) if !Self::better(candidate, current) => {}
            _ => self.best = Some(candidate),
        }
    }
}

impl<const MAX: bool> Accumulator for ExtremeAcc<MAX> {
    type Part = Self;
    fn merge_part(&mut self, part: &Self) {
        self.merge(part);
    }
    fn subtract_part(&mut self, part: &Self) -> bool {
        self.subtract(part)
    }
    fn add(&mut self, input: &Input<'_, '_>) {
        if let Some(n) = Num::of(input.value) {
            self.offer(n);
        }
    }
    fn merge(&mut self, other: &Self) {
        if let Some(n) = other.best {
            self.offer(n);
        }
    }
    fn subtract(&mut self, other: &Self) -> bool {
        // Removing a part that did not hold the extreme leaves the extreme as it is.
        match (self.best, other.best) {
            (_, None) => true,
            (Some(mine), Some(theirs)) => Self::better(mine, theirs),
            (None, Some(_)) => false,
        }
    }
    fn is_empty(&self) -> bool {
        self.best.is_none()
    }
    fn output(&self, _: Agg, ty: ValueType) -> FeatureValue {
        match (self.best, ty) {
            (None, _) => FeatureValue::Null,
            (Some(Num::Int(i)), ValueType::Timestamp) => FeatureValue::Ts(i),
            (Some(Num::Int(i)), _) => FeatureValue::Int(i),
            (Some(Num::Float(f)), _) => FeatureValue::float(f),
        }
    }
}

/// `first` (`LAST = false`) or `last` (`LAST = true`) by event time, ties by arrival.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeAcc<const LAST: bool> {
    best: Option<(i64, u64, FeatureValue)>,
}

impl<const LAST: bool> EdgeAcc<LAST> {
    fn wins(candidate: (i64, u64), current: (i64, u64)) -> bool {
        if LAST {
            candidate > current
        } else {
            candidate < current
        }
    }
}

impl<const LAST: bool> Accumulator for EdgeAcc<LAST> {
    type Part = Self;
    fn merge_part(&mut self, part: &Self) {
        self.merge(part);
    }
    fn subtract_part(&mut self, part: &Self) -> bool {
        self.subtract(part)
    }
    fn add(&mut self, input: &Input<'_, '_>) {
        let key = (input.time, input.seq);
        match &self.best {
            Some((t, s, _)) if !Self::wins(key, (*t, *s)) => {}
            _ => self.best = Some((input.time, input.seq, FeatureValue::from_value(input.value))),
        }
    }
    fn merge(&mut self, other: &Self) {
        if let Some((t, s, v)) = &other.best {
            match &self.best {
                Some((mt, ms, _)) if !Self::wins((*t, *s), (*mt, *ms)) => {}
                _ => self.best = Some((*t, *s, v.clone())),
            }
        }
    }
    fn subtract(&mut self, other: &Self) -> bool {
        match (&self.best, &other.best) {
            (_, None) => true,
            (Some((mt, ms, _)), Some((t, s, _))) => (mt, ms) != (t, s),
            (None, Some(_)) => false,
        }
    }
    fn is_empty(&self) -> bool {
        self.best.is_none()
    }
    fn output(&self, _: Agg, _: ValueType) -> FeatureValue {
        self.best
            .as_ref()
            .map_or(FeatureValue::Null, |(_, _, v)| v.clone())
    }
    fn heap_bytes(&self) -> usize {
        self.best.as_ref().map_or(0, |(_, _, v)| v.heap_bytes())
    }
}

/// Exact distinct count over 64-bit value hashes, with multiplicities so that panes subtract.
/// Small sets are a sorted vector (compact, cache-friendly); past `DISTINCT_MAP_AT` values they
/// move to a hash map so that inserts stay O(1) for entities with many distinct values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DistinctAcc {
    Small(Vec<(u64, u32)>),
    Large(rustc_hash::FxHashMap<u64, u32>),
}

const DISTINCT_MAP_AT: usize = 64;

impl Default for DistinctAcc {
    fn default() -> Self {
        DistinctAcc::Small(Vec::new())
    }
}
pub(crate) fn value_hash(value: &Value<'_>) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    match value {
        Value::Null => 0u8.hash(&mut h),
        Value::Str(s) => {
            1u8.hash(&mut h);
            s.as_bytes().hash(&mut h);
        }
        // Ints and floats with the same numeric value are one value.
        Value::Int(i) | Value::Ts(i) => {
            2u8.hash(&mut h);
            (*i as f64).to_bits().hash(&mut h);
        }
        Value::Float(f) => {
            2u8.hash(&mut h);
            (if *f == 0.0 { 0.0f64 } else { *f }).to_bits().hash(&mut h);
        }
        Value::Bool(b) => {
            3u8.hash(&mut h);
            b.hash(&mut h);
        }
    }
    // FxHash's low bits are weak for short keys; finish with a mix (splitmix64).
    let mut z = h.finish().wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl DistinctAcc {
    fn add_hash(&mut self, hash: u64, count: u32) {
        match self {
            DistinctAcc::Small(v) => {
                match v.binary_search_by_key(&hash, |(h, _)| *h) {
                    Ok(i) => v[i].1 += count,
                    Err(i) => {
                        super::prefetch::reserve_one(v);
                        v.insert(i, (hash, count))
                    }
                }
                if v.len() > DISTINCT_MAP_AT {
                    *self = DistinctAcc::Large(v.iter().copied().collect());
                }
            }
            DistinctAcc::Large(m) => *m.entry(hash).or_default() += count,
        }
    }

    /// Removes `count` occurrences; false if they were not there.
    fn remove_hash(&mut self, hash: u64, count: u32) -> bool {
        match self {
            DistinctAcc::Small(v) => match v.binary_search_by_key(&hash, |(h, _)| *h) {
                Ok(i) if v[i].1 >= count => {
                    v[i].1 -= count;
                    if v[i].1 == 0 {
                        v.remove(i);
                    }
                    true
                }
                _ => false,
            },
            DistinctAcc::Large(m) => match m.get_mut(&hash) {
                Some(c) if *c >= count => {
                    *c -= count;
                    if *c == 0 {
                        m.remove(&hash);
                    }
                    true
                }
                _ => false,
            },
        }
    }

    fn entries(&self) -> Box<dyn Iterator<Item = (u64, u32)> + '_> {
        match self {
            DistinctAcc::Small(v) => Box::new(v.iter().copied()),
            DistinctAcc::Large(m) => Box::new(m.iter().map(|(h, c)| (*h, *c))),
        }
    }

    fn len(&self) -> usize {
        match self {
            DistinctAcc::Small(v) => v.len(),
            DistinctAcc::Large(m) => m.len(),
        }
    }
}

impl Accumulator for DistinctAcc {
    type Part = Self;
    fn merge_part(&mut self, part: &Self) {
        self.merge(part);
    }
    fn subtract_part(&mut self, part: &Self) -> bool {
        self.subtract(part)
    }
    fn add(&mut self, input: &Input<'_, '_>) {
        self.add_hash(value_hash(input.value), 1);
    }
    fn merge(&mut self, other: &Self) {
        for (h, c) in other.entries() {
            self.add_hash(h, c);
        }
    }
    fn subtract(&mut self, other: &Self) -> bool {
        let ok = other.entries().all(|(h, c)| self.remove_hash(h, c));
        if ok
            && let DistinctAcc::Large(m) = self
            && m.len() < DISTINCT_MAP_AT / 2
        {
            let mut v: Vec<(u64, u32)> = m.iter().map(|(h, c)| (*h, *c)).collect();
            v.sort_unstable();
            *self = DistinctAcc::Small(v);
        }
        ok
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn output(&self, _: Agg, _: ValueType) -> FeatureValue {
        FeatureValue::Int(self.len() as i64)
    }
    fn prefetch(&self) {
        if let DistinctAcc::Small(v) = self {
            super::prefetch::prefetch(v.as_ptr());
        }
    }
    fn heap_bytes(&self) -> usize {
        match self {
            DistinctAcc::Small(v) => v.capacity() * std::mem::size_of::<(u64, u32)>(),
            DistinctAcc::Large(m) => m.capacity() * (std::mem::size_of::<(u64, u32)>() + 1),
        }
    }
}

/// A percentile's running sketch, with the last quantile read from it: a timer reading an
/// unchanged sketch (a lifetime percentile, a window no pane left) then does not walk its
/// buckets again. Panes keep plain sketches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SketchAcc {
    sketch: Sketch,
    #[serde(skip)]
    last_quantile: QuantileCache,
}

/// The bits of the last quantile read ([`QuantileCache::EMPTY`]: none read since the sketch
/// last changed; [`QuantileCache::NONE`]: the sketch was empty). Atomic only so that a state
/// read through `&self` can fill it and still be shared between threads.
#[derive(Debug)]
struct QuantileCache(AtomicU64);

impl QuantileCache {
    /// Two NaN bit patterns, which no quantile is.
    const EMPTY: u64 = u64::MAX;
    const NONE: u64 = u64::MAX - 1;

    fn get(&self) -> Option<Option<f64>> {
        match self.0.load(Ordering::Relaxed) {
            Self::EMPTY => None,
            Self::NONE => Some(None),
            bits => Some(Some(f64::from_bits(bits))),
        }
    }

    fn set(&self, quantile: Option<f64>) {
        let bits = quantile.map_or(Self::NONE, f64::to_bits);
        self.0.store(bits, Ordering::Relaxed);
    }

    fn clear(&mut self) {
        *self.0.get_mut() = Self::EMPTY;
    }
}

impl Default for QuantileCache {
    fn default() -> Self {
        QuantileCache(AtomicU64::new(Self::EMPTY))
    }
}

impl Clone for QuantileCache {
    fn clone(&self) -> Self {
        QuantileCache(AtomicU64::new(self.0.load(Ordering::Relaxed)))
    }
}

/// A cache never makes two sketches differ.
impl PartialEq for QuantileCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl SketchAcc {
    /// The sketch, about to change: the quantile read from it no longer holds.
    fn sketch_mut(&mut self) -> &mut Sketch {
        self.last_quantile.clear();
        &mut self.sketch
    }
}

impl Part for Sketch {
    fn add(&mut self, input: &Input<'_, '_>) {
        if let Some(x) = input.value.as_f64() {
            Sketch::add(self, x);
        }
    }
    fn is_empty(&self) -> bool {
        self.count() == 0
    }
    fn heap_bytes(&self) -> usize {
        Sketch::heap_bytes(self)
    }
}

impl Accumulator for SketchAcc {
    type Part = Sketch;
    fn merge_part(&mut self, part: &Sketch) {
        self.sketch_mut().merge(part);
    }
    fn subtract_part(&mut self, part: &Sketch) -> bool {
        self.sketch_mut().subtract(part)
    }
    fn add(&mut self, input: &Input<'_, '_>) {
        if let Some(x) = input.value.as_f64() {
            self.sketch_mut().add(x);
        }
    }
    fn merge(&mut self, other: &Self) {
        self.sketch_mut().merge(&other.sketch);
    }
    fn subtract(&mut self, other: &Self) -> bool {
        self.sketch_mut().subtract(&other.sketch)
    }
    fn is_empty(&self) -> bool {
        self.sketch.count() == 0
    }
    fn output(&self, agg: Agg, _: ValueType) -> FeatureValue {
        let q = if let Agg::Percentile(q) = agg { q } else { 0.5 };
        // One accumulator always serves the same feature, so the same `q`.
        let quantile = self.last_quantile.get().unwrap_or_else(|| {
            let quantile = self.sketch.quantile(q);
            self.last_quantile.set(quantile);
            quantile
        });
        quantile.map_or(FeatureValue::Null, FeatureValue::float)
    }
    fn heap_bytes(&self) -> usize {
        self.sketch.heap_bytes()
    }
    fn prefetch(&self) {
        self.sketch.prefetch();
    }
}
