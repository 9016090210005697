//! Feature state stored by column: for each feature of a pipeline, one vector holding that
//! feature's state for every entity slot of a partition.
//!
//! A feature's state type is fixed by its aggregation and window shape (a sliding count keeps
//! count panes, a lifetime percentile a sketch), so a column holds values of exactly one type,
//! at exactly that type's size: no entity pays for the largest kind of state the engine knows.
//! And the address of an entity's state in every column follows from its slot number alone,
//! so all of it can be requested from memory at once, before the entity header has arrived.

use std::any::Any;
use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::agg::*;
use super::distinct::RecentDistinct;
use super::state::{Clock, Closed};
use super::window::{Panes, Sessions, floor_div};
use crate::config::{Agg, Feature, ValueType, Window};

/// The state of one feature of one entity: one window shape over one accumulator.
pub trait WindowState:
    Debug + Clone + Default + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// Moves the state's notion of "now" to `as_of` (windows slide, panes leave the total).
    fn set_as_of(&mut self, _feature: &Feature, _as_of: i64) {}
    fn add(&mut self, feature: &Feature, input: &Input<'_, '_>);
    fn value(&self, feature: &Feature, watermark: i64) -> FeatureValue;
    /// Closes what the watermark has passed and drops what can no longer matter.
    fn on_watermark(&mut self, _feature: &Feature, _clock: &Clock, _closed: &mut Vec<Closed>) {}
    /// The next watermark at which this state changes by time alone.
    fn next_change(&self, _feature: &Feature, _clock: &Clock) -> Option<i64> {
        None
    }
    /// Starts loading what the state keeps on the heap.
    fn prefetch(&self);
    fn heap_bytes(&self) -> usize;
}

fn output<A: Accumulator>(feature: &Feature, acc: &A) -> FeatureValue {
    acc.output(feature.agg, feature.value_type)
}

/// Pane arithmetic of a hopping window (`None` for other windows): panes are STEP long and a
/// window is `n = SIZE / STEP` of them.
fn pane_of(window: &Window, time: i64) -> Option<i64> {
    match *window {
        Window::Hopping { step_ms, .. } => Some(floor_div(time, step_ms)),
        _ => None,
    }
}

/// The first pane of the window whose last pane holds `time`.
fn first_pane_of_window_at(window: &Window, time: i64) -> Option<i64> {
    match *window {
        Window::Hopping {
            size_ms, step_ms, ..
        } => Some(floor_div(time, step_ms).saturating_sub(size_ms / step_ms - 1)),
        _ => None,
    }
}

/// When pane `pane` leaves the window: the start of the first window without it.
fn pane_leaves_at(window: &Window, pane: i64) -> Option<i64> {
    match *window {
        Window::Hopping {
            size_ms, step_ms, ..
        } => Some((pane + size_ms / step_ms).saturating_mul(step_ms)),
        _ => None,
    }
}

impl<A: Accumulator> WindowState for Panes<A> {
    fn set_as_of(&mut self, feature: &Feature, as_of: i64) {
        if let Some(first) = first_pane_of_window_at(&feature.window, as_of) {
            self.set_running_from(first);
        }
    }

    fn add(&mut self, feature: &Feature, input: &Input<'_, '_>) {
        if let Some(pane) = pane_of(&feature.window, input.time) {
            Panes::add(self, pane, input);
        }
    }

    fn value(&self, feature: &Feature, _watermark: i64) -> FeatureValue {
        output(feature, self.running())
    }

    fn on_watermark(&mut self, feature: &Feature, clock: &Clock, closed: &mut Vec<Closed>) {
        let Window::Hopping {
            size_ms, step_ms, ..
        } = feature.window
        else {
            return;
        };
        let n = size_ms / step_ms;
        if clock.close_windows {
            self.close_windows(
                n,
                step_ms,
                |end| clock.watermark > end.saturating_add(clock.lateness),
                |start, end, acc| closed.push((start, end, output(feature, acc))),
            );
        }
        // Future events are at or after the horizon, so no as-of time can reach further back.
        let horizon = clock.watermark.saturating_sub(clock.lateness);
        let mut keep_from = floor_div(horizon, step_ms).saturating_sub(n - 1);
        if clock.close_windows {
            keep_from = keep_from.min(self.closed_before());
        }
        self.evict_below(keep_from);
    }

    fn next_change(&self, feature: &Feature, clock: &Clock) -> Option<i64> {
        let Window::Hopping {
            size_ms, step_ms, ..
        } = feature.window
        else {
            return None;
        };
        let n = size_ms / step_ms;
        let leaves = self
            .oldest_running()
            .and_then(|pane| pane_leaves_at(&feature.window, pane));
        let closes = if clock.close_windows {
            self.next_window_to_close(n).map(|s| {
                (s + n)
                    .saturating_mul(step_ms)
                    .saturating_add(clock.lateness)
                    .saturating_add(1)
            })
        } else {
            None
        };
        min_opt(leaves, closes)
    }

    fn prefetch(&self) {
        Panes::prefetch(self)
    }

    fn heap_bytes(&self) -> usize {
        Panes::heap_bytes(self)
    }
}

impl<A: Accumulator> WindowState for Sessions<A> {
    fn add(&mut self, feature: &Feature, input: &Input<'_, '_>) {
        if let Window::Session { gap_ms } = feature.window {
            Sessions::add(self, input.time, gap_ms, input);
        }
    }

    fn value(&self, feature: &Feature, watermark: i64) -> FeatureValue {
        let open = match feature.window {
            Window::Session { gap_ms } => self.open(watermark, gap_ms),
            _ => None,
        };
        open.map_or_else(
            || output(feature, &A::default()),
            |acc| output(feature, acc),
        )
    }

    fn on_watermark(&mut self, feature: &Feature, clock: &Clock, closed: &mut Vec<Closed>) {
        if let Window::Session { gap_ms } = feature.window {
            self.finish(clock.watermark, gap_ms, clock.lateness, |s| {
                if clock.close_windows {
                    closed.push((
                        s.start,
                        s.last.saturating_add(gap_ms),
                        output(feature, &s.acc),
                    ));
                }
            });
        }
    }

    fn next_change(&self, feature: &Feature, clock: &Clock) -> Option<i64> {
        match feature.window {
            Window::Session { gap_ms } => {
                Sessions::next_change(self, clock.watermark, gap_ms, clock.lateness)
            }
            _ => None,
        }
    }

    fn prefetch(&self) {
        Sessions::prefetch(self)
    }

    fn heap_bytes(&self) -> usize {
        Sessions::heap_bytes(self)
    }
}

/// An aggregate over every event an entity ever had.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
#[serde(transparent, bound = "")]
pub struct Lifetime<A: Accumulator>(A);

impl<A: Accumulator> WindowState for Lifetime<A> {
    fn add(&mut self, _feature: &Feature, input: &Input<'_, '_>) {
        self.0.add(input);
    }

    fn value(&self, feature: &Feature, _watermark: i64) -> FeatureValue {
        output(feature, &self.0)
    }

    fn prefetch(&self) {
        self.0.prefetch()
    }

    fn heap_bytes(&self) -> usize {
        self.0.heap_bytes()
    }
}

impl WindowState for RecentDistinct {
    fn set_as_of(&mut self, feature: &Feature, as_of: i64) {
        if let Some(first) = first_pane_of_window_at(&feature.window, as_of) {
            self.set_running_from(first);
        }
    }

    fn add(&mut self, feature: &Feature, input: &Input<'_, '_>) {
        if let Some(pane) = pane_of(&feature.window, input.time) {
            RecentDistinct::add(self, pane, input);
        }
    }

    fn value(&self, _feature: &Feature, _watermark: i64) -> FeatureValue {
        FeatureValue::Int(i64::try_from(self.count()).unwrap_or(i64::MAX))
    }

    fn on_watermark(&mut self, feature: &Feature, clock: &Clock, _closed: &mut Vec<Closed>) {
        // As for panes: future events are at or after the horizon.
        let horizon = clock.watermark.saturating_sub(clock.lateness);
        if let Some(keep_from) = first_pane_of_window_at(&feature.window, horizon) {
            self.evict_below(keep_from);
        }
    }

    fn next_change(&self, feature: &Feature, _clock: &Clock) -> Option<i64> {
        pane_leaves_at(&feature.window, self.oldest_running()?)
    }

    fn prefetch(&self) {
        RecentDistinct::prefetch(self)
    }

    fn heap_bytes(&self) -> usize {
        RecentDistinct::heap_bytes(self)
    }
}

pub(crate) fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// One feature's state for every slot of a partition, whatever its type. Slots of removed
/// entities hold the empty state until they are reused.
pub trait Column: Debug + Send + Sync {
    /// Adds a slot at the end, holding the empty state.
    fn push_empty(&mut self);
    /// Makes room for exactly `additional` more slots.
    fn reserve_exact(&mut self, additional: usize);
    /// Returns a slot to the empty state, releasing what it held.
    fn reset(&mut self, slot: usize);
    /// An event's update, in one visit of the slot's state: moves it to `as_of`, adds `input`
    /// if there is one, pushes the value as of the clock's watermark onto `values` (when given)
    /// and returns the next watermark at which time alone changes it.
    fn update_event(
        &mut self,
        slot: usize,
        feature: &Feature,
        as_of: i64,
        input: Option<&Input<'_, '_>>,
        clock: &Clock,
        values: Option<&mut Vec<FeatureValue>>,
    ) -> Option<i64>;
    /// The watermark's update, in one visit: moves the state to `as_of` (when given), closes
    /// into `closed` what the watermark has passed and drops what can no longer matter, pushes
    /// the value onto `values` (when given) and returns the next change by time alone.
    fn update_time(
        &mut self,
        slot: usize,
        feature: &Feature,
        as_of: Option<i64>,
        clock: &Clock,
        closed: &mut Vec<Closed>,
        values: Option<&mut Vec<FeatureValue>>,
    ) -> Option<i64>;
    fn value(&self, slot: usize, feature: &Feature, watermark: i64) -> FeatureValue;
    fn next_change(&self, slot: usize, feature: &Feature, clock: &Clock) -> Option<i64>;
    /// Starts loading the slot's state itself.
    fn prefetch_state(&self, slot: usize);
    /// Starts loading what the slot's state keeps on the heap (the state itself loaded).
    fn prefetch_heap(&self, slot: usize);
    /// Bytes one slot takes in the column, plus what its state keeps on the heap.
    fn slot_bytes(&self, slot: usize) -> usize;
    /// Bytes of slots allocated but not yet used.
    fn spare_bytes(&self) -> usize;
    fn encode(&self, slot: usize, out: Vec<u8>) -> Result<Vec<u8>, postcard::Error>;
    /// Decodes one state from the front of `bytes` into a new slot at the end.
    fn decode_push<'b>(&mut self, bytes: &'b [u8]) -> Result<&'b [u8], postcard::Error>;
    /// An empty column of the same type.
    fn empty_like(&self) -> Box<dyn Column>;
    /// Moves every slot of `other` (a column of the same type) to the end of this one.
    fn append(&mut self, other: Box<dyn Column>);
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

#[derive(Debug)]
struct States<S>(Vec<S>);

impl<S: WindowState> States<S> {
    fn boxed() -> Box<dyn Column> {
        Box::new(States::<S>(Vec::new()))
    }
}

impl<S: WindowState> Column for States<S> {
    fn push_empty(&mut self) {
        self.0.push(S::default());
    }

    fn reserve_exact(&mut self, additional: usize) {
        self.0.reserve_exact(additional);
    }

    fn reset(&mut self, slot: usize) {
        if let Some(state) = self.0.get_mut(slot) {
            *state = S::default();
        }
    }

    fn update_event(
        &mut self,
        slot: usize,
        feature: &Feature,
        as_of: i64,
        input: Option<&Input<'_, '_>>,
        clock: &Clock,
        values: Option<&mut Vec<FeatureValue>>,
    ) -> Option<i64> {
        debug_assert!(slot < self.0.len(), "a column out of step with the slots");
        let state = self.0.get_mut(slot).map(|state| {
            state.set_as_of(feature, as_of);
            if let Some(input) = input {
                state.add(feature, input);
            }
            &*state
        });
        read_after_update(state, feature, clock, values)
    }

    fn update_time(
        &mut self,
        slot: usize,
        feature: &Feature,
        as_of: Option<i64>,
        clock: &Clock,
        closed: &mut Vec<Closed>,
        values: Option<&mut Vec<FeatureValue>>,
    ) -> Option<i64> {
        let state = self.0.get_mut(slot).map(|state| {
            if let Some(as_of) = as_of {
                state.set_as_of(feature, as_of);
            }
            state.on_watermark(feature, clock, closed);
            &*state
        });
        read_after_update(state, feature, clock, values)
    }

    fn value(&self, slot: usize, feature: &Feature, watermark: i64) -> FeatureValue {
        match self.0.get(slot) {
            Some(state) => state.value(feature, watermark),
            None => FeatureValue::Null,
        }
    }

    fn next_change(&self, slot: usize, feature: &Feature, clock: &Clock) -> Option<i64> {
        self.0.get(slot)?.next_change(feature, clock)
    }

    fn prefetch_state(&self, slot: usize) {
        if let Some(state) = self.0.get(slot) {
            // A state may straddle two cache lines: ask for both ends.
            let start = (state as *const S).cast::<u8>();
            super::prefetch::prefetch(start);
            super::prefetch::prefetch(start.wrapping_add(std::mem::size_of::<S>() - 1));
        }
    }

    fn prefetch_heap(&self, slot: usize) {
        if let Some(state) = self.0.get(slot) {
            state.prefetch();
        }
    }

    fn slot_bytes(&self, slot: usize) -> usize {
        std::mem::size_of::<S>() + self.0.get(slot).map_or(0, WindowState::heap_bytes)
    }

    fn spare_bytes(&self) -> usize {
        (self.0.capacity() - self.0.len()) * std::mem::size_of::<S>()
    }

    fn encode(&self, slot: usize, out: Vec<u8>) -> Result<Vec<u8>, postcard::Error> {
        match self.0.get(slot) {
            Some(state) => postcard::to_extend(state, out),
            None => postcard::to_extend(&S::default(), out),
        }
    }

    fn decode_push<'b>(&mut self, bytes: &'b [u8]) -> Result<&'b [u8], postcard::Error> {
        let (state, rest) = postcard::take_from_bytes::<S>(bytes)?;
        self.0.push(state);
        Ok(rest)
    }

    fn empty_like(&self) -> Box<dyn Column> {
        States::<S>::boxed()
    }

    fn append(&mut self, other: Box<dyn Column>) {
        match other.into_any().downcast::<States<S>>() {
            Ok(mut other) => self.0.append(&mut other.0),
            // Columns are built from the same pipeline; a mismatch is a bug, not bad input.
            Err(_) => panic!("appending a column of another state type"),
        }
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// What both updates end with: the value pushed onto `values` (when given; null for a slot
/// out of range) and the next change by time alone.
fn read_after_update<S: WindowState>(
    state: Option<&S>,
    feature: &Feature,
    clock: &Clock,
    values: Option<&mut Vec<FeatureValue>>,
) -> Option<i64> {
    if let Some(values) = values {
        values.push(state.map_or(FeatureValue::Null, |s| s.value(feature, clock.watermark)));
    }
    state?.next_change(feature, clock)
}

/// The empty column that holds `feature`'s state; `close_windows` is whether closed windows
/// are emitted (`emit: on_window_close`).
pub fn column_for(feature: &Feature, close_windows: bool) -> Box<dyn Column> {
    fn of<A: Accumulator>(window: &Window) -> Box<dyn Column> {
        match window {
            Window::Hopping { .. } => States::<Panes<A>>::boxed(),
            Window::Session { .. } => States::<Sessions<A>>::boxed(),
            Window::Lifetime => States::<Lifetime<A>>::boxed(),
        }
    }
    let window = &feature.window;
    match feature.agg {
        // A distinct count over hopping windows with `emit: on_update` (see `distinct.rs`).
        Agg::DistinctCount if !close_windows && matches!(window, Window::Hopping { .. }) => {
            States::<RecentDistinct>::boxed()
        }
        Agg::Count => of::<CountAcc>(window),
        Agg::Sum if feature.value_type == ValueType::Int => of::<SumIntAcc>(window),
        Agg::Sum => of::<SumFloatAcc>(window),
        Agg::Mean | Agg::Stddev | Agg::Variance | Agg::StddevPop | Agg::VariancePop => {
            of::<MomentsAcc>(window)
        }
        Agg::Min => of::<ExtremeAcc<false>>(window),
        Agg::Max => of::<ExtremeAcc<true>>(window),
        Agg::First => of::<EdgeAcc<false>>(window),
        Agg::Last => of::<EdgeAcc<true>>(window),
        Agg::DistinctCount => of::<DistinctAcc>(window),
        Agg::Percentile(_) => of::<SketchAcc>(window),
    }
}
