//! The engine against a brute-force reference: PRODUCT.md's formulas evaluated directly over
//! the raw accepted events, for random streams with out-of-order, late and bursty events.

use std::borrow::Cow;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::config::{Agg, Feature, Window, compile_source};
use crate::decode::Value;

const ON_UPDATE: &str = r#"
name: prop
source:
  kafka: { brokers: "127.0.0.1:9092", topic: t, group_id: g }
  schema: { card: string, merchant: string, amount: float?, status: string, ts: timestamp }
  entity: card
  event_time: ts
  watermark: { max_out_of_order: 3s }
  allowed_lateness: 2s
features:
  - { name: n_sliding, agg: count, window: { sliding: 10s } }
  - { name: sum_hop, agg: sum, field: amount, window: { hopping: 12s, step: 4s } }
  - { name: sum_tumble, agg: sum, field: amount, window: { tumbling: 7s } }
  - { name: mean_step, agg: mean, field: amount, window: { sliding: 12s, step: 3s } }
  - { name: std_slide, agg: stddev, field: amount, window: { sliding: 9s } }
  - { name: var_pop, agg: variance_pop, field: amount, window: { hopping: 8s, step: 2s } }
  - { name: min_slide, agg: min, field: amount, window: { sliding: 6s } }
  - { name: max_hop, agg: max, field: amount, window: { hopping: 6s, step: 3s } }
  - { name: first_slide, agg: first, field: merchant, window: { sliding: 8s } }
  - { name: last_slide, agg: last, field: merchant, window: { sliding: 8s } }
  - { name: distinct_hop, agg: distinct_count, field: merchant, window: { hopping: 12s, step: 4s } }
  - { name: distinct_slide, agg: distinct_count, field: merchant, window: { sliding: 7s } }
  - { name: distinct_tumble, agg: distinct_count, field: amount, window: { tumbling: 5s } }
  - { name: declined, agg: count, where: 'status == "declined"', window: { sliding: 15s } }
  - { name: p90, agg: { percentile: 0.9 }, field: amount, window: { sliding: 20s } }
  - { name: sess_n, agg: count, window: { session: 4s } }
  - { name: sess_sum, agg: sum, field: amount, window: { session: 4s } }
  - { name: life_n, agg: count, window: lifetime }
  - { name: life_first, agg: first, field: amount, window: lifetime }
  - { name: life_last, agg: last, field: amount, window: lifetime }
state: { entity_ttl: never }
"#;

fn pipeline(text: &str) -> Arc<Pipeline> {
    Arc::new(compile_source("test.yaml", text).unwrap_or_else(|e| panic!("{e}")))
}

#[derive(Debug, Clone)]
struct Ev {
    card: u8,
    merchant: u8,
    amount: Option<f64>,
    declined: bool,
    time: i64,
}

impl Ev {
    fn decoded(&self) -> DecodedEvent<'static> {
        DecodedEvent {
            entity: Cow::Owned(format!("c{}", self.card)),
            time_ms: self.time,
            fields: vec![
                Value::Str(Cow::Owned(format!("c{}", self.card))),
                Value::Str(Cow::Owned(format!("m{}", self.merchant))),
                self.amount.map_or(Value::Null, Value::Float),
                Value::Str(Cow::Borrowed(if self.declined { "declined" } else { "ok" })),
                Value::Ts(self.time),
            ],
        }
    }
}

/// Random streams: a drifting clock with jitter, bursts, long gaps, and some events far behind.
fn stream() -> impl Strategy<Value = Vec<Ev>> {
    let step = prop_oneof![
        6 => 0i64..1_500,
        1 => 0i64..1,
        1 => 4_000i64..25_000,
    ];
    let jitter = prop_oneof![8 => 0i64..1, 3 => -4_000i64..0, 1 => -9_000i64..-4_000];
    // Now and then an amount a million times the others: when it leaves a window, what
    // remains must be as exact as if it had never been there.
    let amount = prop_oneof![
        1 => Just(None),
        6 => (-5_000i64..100_000).prop_map(|c| Some(c as f64 / 100.0)),
        1 => (1_000_000_000i64..100_000_000_000).prop_map(|c| Some(c as f64 / 100.0)),
    ];
    prop::collection::vec(
        (
            0u8..4,
            0u8..5,
            amount,
            prop::bool::weighted(0.2),
            step,
            jitter,
        ),
        1..120,
    )
    .prop_map(|raw| {
        let mut clock = 1_700_000_000_000i64;
        raw.into_iter()
            .map(|(card, merchant, amount, declined, step, jitter)| {
                clock += step;
                Ev {
                    card,
                    merchant,
                    amount,
                    declined,
                    time: clock + jitter,
                }
            })
            .collect()
    })
}

/// The exact value of one aggregation over `(time, arrival, value)` triples.
fn reference(feature: &Feature, events: &[(i64, u64, &Ev)]) -> FeatureValue {
    let matching: Vec<&(i64, u64, &Ev)> = events
        .iter()
        .filter(|(_, _, e)| feature.filter.as_ref().is_none_or(|_| e.declined))
        .collect();
    let amounts: Vec<f64> = matching.iter().filter_map(|(_, _, e)| e.amount).collect();
    let n = amounts.len() as f64;
    let mean = amounts.iter().sum::<f64>() / n;
    let m2: f64 = amounts.iter().map(|a| (a - mean) * (a - mean)).sum();
    let field_is_merchant = feature.field == Some(1);
    let float = |present: bool, v: f64| {
        if present {
            FeatureValue::Float(v)
        } else {
            FeatureValue::Null
        }
    };
    match feature.agg {
        Agg::Count if feature.field.is_none() => FeatureValue::Int(matching.len() as i64),
        Agg::Count => FeatureValue::Int(amounts.len() as i64),
        Agg::Sum => float(!amounts.is_empty(), amounts.iter().sum()),
        Agg::Mean => float(n >= 1.0, mean),
        Agg::Stddev => float(n >= 2.0, (m2 / (n - 1.0)).sqrt()),
        Agg::Variance => float(n >= 2.0, m2 / (n - 1.0)),
        Agg::StddevPop => float(n >= 1.0, (m2 / n).sqrt()),
        Agg::VariancePop => float(n >= 1.0, m2 / n),
        Agg::Min => amounts
            .iter()
            .copied()
            .reduce(f64::min)
            .map_or(FeatureValue::Null, FeatureValue::Float),
        Agg::Max => amounts
            .iter()
            .copied()
            .reduce(f64::max)
            .map_or(FeatureValue::Null, FeatureValue::Float),
        Agg::DistinctCount if field_is_merchant => {
            let mut merchants: Vec<u8> = matching.iter().map(|(_, _, e)| e.merchant).collect();
            merchants.sort_unstable();
            merchants.dedup();
            FeatureValue::Int(merchants.len() as i64)
        }
        Agg::DistinctCount => {
            // Nulls are not values; numerically equal floats are one value.
            let mut values: Vec<u64> = amounts
                .iter()
                .map(|a| if *a == 0.0 { 0.0f64 } else { *a }.to_bits())
                .collect();
            values.sort_unstable();
            values.dedup();
            FeatureValue::Int(values.len() as i64)
        }
        Agg::First | Agg::Last => {
            let with_value: Vec<&&(i64, u64, &Ev)> = matching
                .iter()
                .filter(|(_, _, e)| field_is_merchant || e.amount.is_some())
                .collect();
            let pick = if feature.agg == Agg::First {
                with_value.iter().min_by_key(|(t, s, _)| (*t, *s))
            } else {
                with_value.iter().max_by_key(|(t, s, _)| (*t, *s))
            };
            match pick {
                None => FeatureValue::Null,
                Some((_, _, e)) if field_is_merchant => {
                    FeatureValue::Str(format!("m{}", e.merchant).into())
                }
                Some((_, _, e)) => e.amount.map_or(FeatureValue::Null, FeatureValue::Float),
            }
        }
        Agg::Percentile(q) => {
            let mut sorted = amounts.clone();
            sorted.sort_by(f64::total_cmp);
            if sorted.is_empty() {
                FeatureValue::Null
            } else {
                FeatureValue::Float(sorted[(q * (sorted.len() - 1) as f64).floor() as usize])
            }
        }
    }
}

/// The value as of `as_of` with watermark `w`, from the formulas in docs/semantics.md, with the
/// largest magnitude and the sum of magnitudes of the values in the window (see
/// [`close_enough`]).
fn as_of_value(
    feature: &Feature,
    events: &[(i64, u64, &Ev)],
    as_of: i64,
    w: i64,
) -> (FeatureValue, f64, f64) {
    match feature.window {
        Window::Hopping {
            size_ms, step_ms, ..
        } => {
            let start = as_of.div_euclid(step_ms) * step_ms + step_ms - size_ms;
            let inside: Vec<_> = events
                .iter()
                .filter(|(t, _, _)| start <= *t && *t <= as_of)
                .cloned()
                .collect();
            windowed(feature, &inside)
        }
        Window::Session { gap_ms } => {
            let relevant: Vec<_> = events
                .iter()
                .filter(|(_, _, e)| feature.field.is_none() || e.amount.is_some())
                .cloned()
                .collect();
            let mut times: Vec<i64> = relevant.iter().map(|(t, _, _)| *t).collect();
            times.sort_unstable();
            let Some(&last) = times.last() else {
                return windowed(feature, &[]);
            };
            let mut first = last;
            for pair in times.windows(2).rev() {
                if pair[1] - pair[0] < gap_ms {
                    first = pair[0];
                } else {
                    break;
                }
            }
            if w > last + gap_ms {
                return windowed(feature, &[]);
            }
            let inside: Vec<_> = relevant
                .iter()
                .filter(|(t, _, _)| *t >= first)
                .cloned()
                .collect();
            windowed(feature, &inside)
        }
        Window::Lifetime => windowed(feature, events),
    }
}

/// [`reference`] with the magnitudes of the values it aggregated.
fn windowed(feature: &Feature, inside: &[(i64, u64, &Ev)]) -> (FeatureValue, f64, f64) {
    let (scale, total) = magnitudes(inside);
    (reference(feature, inside), scale, total)
}

/// Float results are compared with the error that floating point allows for each aggregate:
/// sums and means relative to the sum of magnitudes, spreads relative to the largest value,
/// percentiles within the sketch's documented bound. `scale` is the largest magnitude among the
/// values in the window and `total` the sum of their magnitudes: values that have left the
/// window (a 1e8 among amounts of a few cents) must not loosen the bound.
fn close_enough(got: &FeatureValue, want: &FeatureValue, agg: Agg, scale: f64, total: f64) -> bool {
    match (got, want) {
        (FeatureValue::Float(g), FeatureValue::Float(w)) => {
            let tolerance = match agg {
                Agg::Percentile(_) => sketch::RELATIVE_ACCURACY * w.abs() + 1e-9,
                Agg::Stddev | Agg::StddevPop => 1e-7 * scale.max(1.0),
                Agg::Variance | Agg::VariancePop => 1e-7 * scale.max(1.0).powi(2),
                _ => 1e-12 * total.max(1.0) + 1e-9 * w.abs().max(1.0),
            };
            (g - w).abs() <= tolerance
        }
        _ => got == want,
    }
}

/// The largest magnitude and the sum of magnitudes of the amounts in `events`.
fn magnitudes(events: &[(i64, u64, &Ev)]) -> (f64, f64) {
    events
        .iter()
        .filter_map(|(_, _, e)| e.amount)
        .fold((0.0, 0.0), |(max, sum), a| {
            (f64::max(max, a.abs()), sum + a.abs())
        })
}

fn check_values(
    p: &Pipeline,
    got: &[FeatureValue],
    events: &[(i64, u64, &Ev)],
    as_of: i64,
    w: i64,
) -> Result<(), TestCaseError> {
    for (feature, value) in p.features.iter().zip(got) {
        let (want, scale, total) = as_of_value(feature, events, as_of, w);
        prop_assert!(
            close_enough(value, &want, feature.agg, scale, total),
            "feature {} as of {} (w {}): engine {:?}, reference {:?}",
            feature.name,
            as_of,
            w,
            value,
            want
        );
    }
    Ok(())
}

/// Runs the stream, checking every record and every entity's current values after each event.
fn run_and_check(
    p: &Arc<Pipeline>,
    events: &[Ev],
    restore_at: Option<usize>,
) -> Result<Vec<Record>, TestCaseError> {
    let mut engine = Engine::new(Arc::clone(p));
    engine.assign(0, 0);
    let lateness = p.source.allowed_lateness_ms;
    let mut accepted: Vec<(i64, u64, &Ev)> = Vec::new();
    let mut w = i64::MIN;
    let mut max_time = i64::MIN;
    let mut all = Vec::new();
    let mut last_emitted: std::collections::BTreeMap<String, Vec<FeatureValue>> =
        Default::default();
    for (i, ev) in events.iter().enumerate() {
        if restore_at == Some(i) {
            let bytes = engine
                .snapshot_partition(0)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let watermark = engine.watermark();
            engine = Engine::new(Arc::clone(p));
            engine.restore_watermark(watermark);
            engine
                .restore_partition(0, &bytes, 0)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let mut records = Vec::new();
        let outcome = engine.process(0, &ev.decoded(), 0, &mut records);
        let late = ev.time < w.saturating_sub(lateness);
        prop_assert_eq!(
            outcome == Outcome::Aggregated,
            !late,
            "lateness of event {} at {}",
            i,
            ev.time
        );
        let w_before = w;
        if !late {
            accepted.push((ev.time, i as u64, ev));
            max_time = max_time.max(ev.time);
            w = w.max(max_time - p.source.max_out_of_order_ms);
        }
        prop_assert_eq!(engine.watermark(), (w != i64::MIN).then_some(w));
        for (k, record) in records.iter().enumerate() {
            let Record::Update {
                entity,
                as_of,
                values,
            } = record
            else {
                return Err(TestCaseError::fail("unexpected window record"));
            };
            let mine: Vec<_> = accepted
                .iter()
                .filter(|(_, _, e)| format!("c{}", e.card) == *entity)
                .cloned()
                .collect();
            // The event's own record comes first and sees the watermark from before it.
            let w_at = if k == 0 && !late { w_before } else { w };
            check_values(p, values, &mine, *as_of, w_at)?;
            last_emitted.insert(entity.clone(), values.clone());
        }
        if !late {
            let own = format!("c{}", ev.card);
            let first_is_own =
                matches!(&records[0], Record::Update { entity, .. } if *entity == own);
            prop_assert!(first_is_own, "the event's own record comes first");
        }
        // Whatever time changed has been emitted: the newest record equals the current value.
        for (entity, emitted) in &last_emitted {
            let (as_of, now) = engine
                .lookup(entity)
                .ok_or_else(|| TestCaseError::fail("entity lost"))?;
            let mine: Vec<_> = accepted
                .iter()
                .filter(|(_, _, e)| format!("c{}", e.card) == *entity)
                .cloned()
                .collect();
            check_values(p, &now, &mine, as_of, w)?;
            for ((f, a), b) in p.features.iter().zip(&now).zip(emitted) {
                prop_assert!(
                    a == b,
                    "{} of {} changed without a record: {:?} vs {:?}",
                    f.name,
                    entity,
                    a,
                    b
                );
            }
        }
        all.extend(records);
    }
    Ok(all)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn on_update_records_match_the_reference(events in stream()) {
        let p = pipeline(ON_UPDATE);
        run_and_check(&p, &events, None)?;
    }

    #[test]
    fn snapshot_and_restore_midway_changes_nothing(events in stream(), cut in 0usize..120) {
        let p = pipeline(ON_UPDATE);
        let straight = run_and_check(&p, &events, None)?;
        let restored = run_and_check(&p, &events, Some(cut % events.len()))?;
        prop_assert_eq!(straight, restored);
    }

    #[test]
    fn window_close_records_match_the_reference(events in stream()) {
        let text = r#"
name: prop_close
source:
  kafka: { brokers: "127.0.0.1:9092", topic: t, group_id: g }
  schema: { card: string, merchant: string, amount: float?, status: string, ts: timestamp }
  entity: card
  event_time: ts
  watermark: { max_out_of_order: 3s }
  allowed_lateness: 2s
features:
  - { name: n_hop, agg: count, window: { hopping: 12s, step: 4s } }
  - { name: sum_tumble, agg: sum, field: amount, window: { tumbling: 7s } }
  - { name: max_step, agg: max, field: amount, window: { sliding: 6s, step: 2s } }
  - { name: distinct, agg: distinct_count, field: merchant, window: { hopping: 12s, step: 6s } }
  - { name: sess, agg: count, window: { session: 4s } }
  - { name: sess_mean, agg: mean, field: amount, window: { session: 4s } }
sinks:
  kafka: { topic: out, emit: on_window_close }
state: { entity_ttl: never }
"#;
        let p = pipeline(text);
        let mut engine = Engine::new(Arc::clone(&p));
        engine.assign(0, 0);
        let mut records = Vec::new();
        let mut accepted = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            if engine.process(0, &ev.decoded(), 0, &mut records) == Outcome::Aggregated {
                accepted.push((ev.time, i as u64, ev));
            }
        }
        let w = engine.watermark().unwrap_or(i64::MIN);
        let lateness = p.source.allowed_lateness_ms;
        // Every window with data that the watermark passed, and nothing else, exactly once.
        let mut expected = Vec::new();
        for card in 0u8..4 {
            let entity = format!("c{card}");
            for (index, feature) in p.features.iter().enumerate() {
                let mine: Vec<_> = accepted
                    .iter()
                    .filter(|(_, _, e)| e.card == card && (feature.field != Some(2) || e.amount.is_some()))
                    .cloned()
                    .collect();
                match feature.window {
                    Window::Hopping { size_ms, step_ms, .. } => {
                        let mut starts: Vec<i64> = mine
                            .iter()
                            .flat_map(|(t, _, _)| {
                                let last = t.div_euclid(step_ms) * step_ms;
                                (0..size_ms / step_ms).map(move |k| last - k * step_ms)
                            })
                            .collect();
                        starts.sort_unstable();
                        starts.dedup();
                        for s in starts {
                            if w > s + size_ms + lateness {
                                let inside: Vec<_> = mine.iter().filter(|(t, _, _)| s <= *t && *t < s + size_ms).cloned().collect();
                                expected.push((entity.clone(), index, s, s + size_ms, reference(feature, &inside)));
                            }
                        }
                    }
                    Window::Session { gap_ms } => {
                        let mut sorted = mine.clone();
                        sorted.sort_by_key(|(t, s, _)| (*t, *s));
                        let mut sessions: Vec<Vec<(i64, u64, &Ev)>> = Vec::new();
                        for e in sorted {
                            match sessions.last_mut() {
                                Some(s) if e.0 - s.last().map_or(i64::MIN, |l| l.0) < gap_ms => s.push(e),
                                _ => sessions.push(vec![e]),
                            }
                        }
                        for s in sessions {
                            let (first, last) = (s[0].0, s[s.len() - 1].0);
                            if w > last + gap_ms + lateness {
                                expected.push((entity.clone(), index, first, last + gap_ms, reference(feature, &s)));
                            }
                        }
                    }
                    Window::Lifetime => {}
                }
            }
        }
        let mut got: Vec<_> = records
            .into_iter()
            .map(|r| match r {
                Record::WindowClosed { entity, feature, start, end, value } => Ok((entity, feature, start, end, value)),
                other => Err(TestCaseError::fail(format!("unexpected {other:?}"))),
            })
            .collect::<Result<_, _>>()?;
        got.sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
        expected.sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
        prop_assert_eq!(got.len(), expected.len(), "windows: got {:?}\nwant {:?}", got, expected);
        for (g, e) in got.iter().zip(&expected) {
            prop_assert_eq!((&g.0, g.1, g.2, g.3), (&e.0, e.1, e.2, e.3));
            let mine: Vec<_> = accepted.iter().filter(|(_, _, ev)| format!("c{}", ev.card) == g.0).cloned().collect();
            let (scale, total) = magnitudes(&mine);
            prop_assert!(close_enough(&g.4, &e.4, p.features[g.1].agg, scale, total), "{:?} vs {:?}", g, e);
        }
    }
}

/// A pipeline over the test schema, keyed by card; `rest` holds its features, sinks and state.
fn card_pipeline(name: &str, rest: &str) -> Arc<Pipeline> {
    pipeline(&format!(
        r#"
name: {name}
source:
  kafka: {{ brokers: "127.0.0.1:9092", topic: t, group_id: g }}
  schema: {{ card: string, merchant: string, amount: float?, status: string, ts: timestamp }}
  entity: card
  event_time: ts
{rest}"#
    ))
}

/// An approved payment of `amount` on card `card` at `time`.
fn paid(card: u8, amount: f64, time: i64) -> Ev {
    Ev {
        card,
        merchant: 0,
        amount: Some(amount),
        declined: false,
        time,
    }
}

#[test]
fn quiet_entity_decays_and_then_expires() {
    let p = card_pipeline(
        "ttl",
        r#"
features:
  - { name: n, agg: count, window: { sliding: 10s } }
  - { name: total, agg: count, window: lifetime }
state: { entity_ttl: 60s }
"#,
    );
    let mut engine = Engine::new(Arc::clone(&p));
    engine.assign(0, 0);
    let ev = |card: u8, time: i64| paid(card, 1.0, time);
    let mut records = Vec::new();
    engine.process(0, &ev(1, 0).decoded(), 0, &mut records);
    engine.process(0, &ev(2, 10_000).decoded(), 0, &mut records);
    // At W = 10s the card-1 event (t = 0) has left its 10 s window: a decay record as of W.
    assert_eq!(
        records,
        vec![
            Record::Update {
                entity: "c1".into(),
                as_of: 0,
                values: vec![FeatureValue::Int(1), FeatureValue::Int(1)]
            },
            Record::Update {
                entity: "c2".into(),
                as_of: 10_000,
                values: vec![FeatureValue::Int(1), FeatureValue::Int(1)]
            },
            Record::Update {
                entity: "c1".into(),
                as_of: 10_000,
                values: vec![FeatureValue::Int(0), FeatureValue::Int(1)]
            },
        ]
    );
    records.clear();
    engine.process(0, &ev(2, 60_001).decoded(), 0, &mut records);
    assert!(
        engine.lookup("c1").is_none(),
        "c1 is older than the TTL and must be gone"
    );
    engine.process(0, &ev(1, 60_002).decoded(), 0, &mut records);
    assert_eq!(
        engine.lookup("c1").map(|(_, v)| v[1].clone()),
        Some(FeatureValue::Int(1))
    );
}

#[test]
fn a_large_value_leaving_the_window_leaves_exact_spreads_and_sums() {
    let p = card_pipeline(
        "outlier",
        r#"
features:
  - { name: var, agg: variance, field: amount, window: { sliding: 10m } }
  - { name: sd_pop, agg: stddev_pop, field: amount, window: { sliding: 10m } }
  - { name: mean, agg: mean, field: amount, window: { sliding: 10m } }
  - { name: sum, agg: sum, field: amount, window: { sliding: 10m } }
  - { name: hop_var, agg: variance, field: amount, window: { hopping: 20m, step: 5m } }
"#,
    );
    let mut engine = Engine::new(Arc::clone(&p));
    engine.assign(0, 0);
    let minute = 60_000;
    let ev = |amount: f64, time: i64| paid(1, amount, time);
    let mut records = Vec::new();
    for (amount, at) in [(1e8, 0), (0.1, 5), (0.2, 6), (0.3, 11)] {
        engine.process(0, &ev(amount, at * minute).decoded(), 0, &mut records);
    }
    // At 12:11 the 10-minute window holds 0.1, 0.2 and 0.3; the 20-minute hopping window
    // [12:00, 12:20) still holds the 1e8.
    let (_, values) = engine.lookup("c1").expect("c1 has state");
    let float = |v: &FeatureValue| match v {
        FeatureValue::Float(f) => *f,
        other => panic!("{other:?} is not a float"),
    };
    let want = [0.01, (0.02f64 / 3.0).sqrt(), 0.2, 0.6];
    for (i, want) in want.into_iter().enumerate() {
        let got = float(&values[i]);
        assert!(
            (got - want).abs() <= 1e-12,
            "{}: {got}, want {want}",
            p.features[i].name
        );
    }
    // Once the hopping window has moved past 12:00 it holds only the small values too.
    for (amount, at) in [(0.4, 20), (0.5, 21)] {
        engine.process(0, &ev(amount, at * minute).decoded(), 0, &mut records);
    }
    let (_, values) = engine.lookup("c1").expect("c1 has state");
    let small = [0.1f64, 0.2, 0.3, 0.4, 0.5];
    let mean = small.iter().sum::<f64>() / 5.0;
    let var = small.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0;
    let got = float(&values[4]);
    assert!((got - var).abs() <= 1e-12, "hop_var: {got}, want {var}");
    // Values that cancel exactly leave an exact zero.
    for (amount, at) in [(0.0, 40), (0.0, 41), (0.0, 42)] {
        engine.process(0, &ev(amount, at * minute).decoded(), 0, &mut records);
    }
    let (_, values) = engine.lookup("c1").expect("c1 has state");
    assert_eq!(values[3], FeatureValue::Float(0.0));
    assert_eq!(values[1], FeatureValue::Float(0.0));
}

#[test]
fn expiry_comes_after_what_the_same_watermark_made_due() {
    let text = |window: &str, emit: &str| {
        format!(
            r#"
features:
  - {{ name: total, agg: sum, field: amount, window: {window} }}
sinks:
  kafka: {{ topic: o, emit: {emit} }}
state: {{ entity_ttl: 1h }}
"#
        )
    };
    let hour = 3_600_000;
    let ev = paid;
    // on_update: card 1's 10-minute window empties and its TTL passes in one watermark step;
    // its decayed value is still published before it is dropped.
    let p = card_pipeline("expiry", &text("{ sliding: 10m }", "on_update"));
    let mut engine = Engine::new(Arc::clone(&p));
    engine.assign(0, 0);
    let mut records = Vec::new();
    engine.process(0, &ev(1, 5.0, 12 * hour).decoded(), 0, &mut records);
    engine.process(0, &ev(2, 1.0, 14 * hour).decoded(), 0, &mut records);
    assert_eq!(
        records.last(),
        Some(&Record::Update {
            entity: "c1".into(),
            as_of: 14 * hour,
            values: vec![FeatureValue::Null],
        })
    );
    assert!(engine.lookup("c1").is_none(), "c1 expired after its decay");
    // on_window_close: card 1 expires (1 h TTL) long before its day window closes; the window
    // is still emitted, and the entity goes once it has been.
    let p = card_pipeline("expiry", &text("{ tumbling: 1d }", "on_window_close"));
    let mut engine = Engine::new(Arc::clone(&p));
    engine.assign(0, 0);
    let mut records = Vec::new();
    engine.process(0, &ev(1, 5.0, hour).decoded(), 0, &mut records);
    engine.process(0, &ev(2, 1.0, 3 * hour).decoded(), 0, &mut records);
    assert!(records.is_empty(), "{records:?}");
    engine.process(0, &ev(2, 1.0, 24 * hour + 1).decoded(), 0, &mut records);
    let closed: Vec<_> = records
        .iter()
        .map(|r| match r {
            Record::WindowClosed { entity, value, .. } => (entity.as_str(), value.clone()),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        closed,
        vec![
            ("c1", FeatureValue::Float(5.0)),
            ("c2", FeatureValue::Float(1.0))
        ]
    );
    assert!(engine.lookup("c1").is_none(), "c1 expired once emitted");
}

#[test]
fn an_idle_partition_stops_holding_the_watermark_back() {
    let text = r#"
name: idle
source:
  kafka: { brokers: "127.0.0.1:9092", topic: t, group_id: g }
  schema: { card: string, merchant: string, amount: float?, status: string, ts: timestamp }
  entity: card
  event_time: ts
  watermark: { max_out_of_order: 0s, idle_timeout: 30s }
features:
  - { name: n, agg: count, window: { sliding: 10s } }
"#;
    let p = pipeline(text);
    let mut engine = Engine::new(Arc::clone(&p));
    engine.assign(0, 0);
    engine.assign(1, 0);
    let ev = |time: i64| Ev {
        card: 1,
        merchant: 0,
        amount: None,
        declined: false,
        time,
    };
    let mut records = Vec::new();
    engine.process(0, &ev(1_000).decoded(), 1_000, &mut records);
    engine.process(1, &ev(500).decoded(), 1_000, &mut records);
    assert_eq!(
        engine.watermark(),
        Some(500),
        "the minimum over active partitions"
    );
    engine.process(0, &ev(60_000).decoded(), 20_000, &mut records);
    assert_eq!(
        engine.watermark(),
        Some(500),
        "partition 1 is quiet but not yet idle"
    );
    engine.tick(40_000, &mut records);
    assert_eq!(
        engine.watermark(),
        Some(60_000),
        "partition 1 idle for more than 30 s"
    );
    // New data on partition 1 makes it active again; the watermark never goes back.
    engine.process(1, &ev(59_000).decoded(), 41_000, &mut records);
    assert_eq!(engine.watermark(), Some(60_000));
}

/// After every partition went idle, the first partition read when events come back does not
/// carry the watermark past the others: a burst of in-order events over several partitions,
/// read one partition after the other, has no late event.
#[test]
fn a_stream_resuming_after_a_pause_is_not_made_late_by_its_first_partition() {
    let text = r#"
name: resume
source:
  kafka: { brokers: "127.0.0.1:9092", topic: t, group_id: g }
  schema: { card: string, merchant: string, amount: float?, status: string, ts: timestamp }
  entity: card
  event_time: ts
  watermark: { max_out_of_order: 10s, idle_timeout: 5s }
  allowed_lateness: 20s
features:
  - { name: n, agg: count, window: { sliding: 10m } }
"#;
    let p = pipeline(text);
    let mut engine = Engine::new(Arc::clone(&p));
    let partitions = [0u32, 1, 2];
    for partition in partitions {
        engine.assign(partition, 0);
    }
    // Thirty cards, as thirty drivers or customers would be.
    let ev = |i: u32, time: i64| Ev {
        card: (i % 30) as u8,
        merchant: 0,
        amount: None,
        declined: false,
        time,
    };
    let second = 1_000;
    let mut records = Vec::new();
    // Thirty events, one a second, spread over the partitions, read as they come.
    for i in 0..30u32 {
        let outcome = engine.process(
            i % 3,
            &ev(i, i64::from(i) * second).decoded(),
            i64::from(i) * 10,
            &mut records,
        );
        assert!(matches!(outcome, Outcome::Aggregated));
    }
    // Ten seconds of quiet: every partition idle, the watermark at the newest of them.
    engine.tick(10_300, &mut records);
    assert_eq!(engine.watermark(), Some(29 * second - 10 * second));
    // Six hundred more, one a second, fetched together and read one partition after another.
    let mut late = 0;
    for partition in partitions {
        for i in (30..630u32).filter(|i| i % 3 == partition) {
            let event = ev(i, i64::from(i) * second).decoded();
            if let Outcome::Late { .. } = engine.process(partition, &event, 10_400, &mut records) {
                late += 1;
            }
        }
    }
    assert_eq!(late, 0, "in-order events are never late");
    assert_eq!(engine.watermark(), Some(627 * second - 10 * second));
    // After another pause, one partition resumes alone: the others count as active until they
    // have been quiet for `idle_timeout` again, then the watermark leaves them behind.
    engine.process(0, &ev(0, 700 * second).decoded(), 16_000, &mut records);
    assert_eq!(engine.watermark(), Some(628 * second - 10 * second));
    engine.tick(21_001, &mut records);
    assert_eq!(engine.watermark(), Some(690 * second));
}

/// Many entities: the snapshot is encoded and decoded in several chunks on parallel threads,
/// and what comes back is the same state (same look-ups, and the same bytes again); a damaged
/// snapshot is an error.
#[test]
fn large_snapshot_round_trips() {
    let p = pipeline(ON_UPDATE);
    let mut engine = Engine::new(Arc::clone(&p));
    engine.assign(0, 0);
    let mut records = Vec::new();
    for i in 0..30_000u32 {
        let entity = format!("entity-{i}");
        let event = DecodedEvent {
            entity: Cow::Owned(entity.clone()),
            time_ms: 1_700_000_000_000 + i64::from(i) * 7,
            fields: vec![
                Value::Str(Cow::Owned(entity)),
                Value::Str(Cow::Owned(format!("m{}", i % 17))),
                Value::Float(f64::from(i % 100) + 0.5),
                Value::Str(Cow::Borrowed("ok")),
                Value::Ts(1_700_000_000_000 + i64::from(i) * 7),
            ],
        };
        engine.process(0, &event, 0, &mut records);
    }
    let bytes = engine.snapshot_partition(0).expect("encodes");
    let mut restored = Engine::new(Arc::clone(&p));
    restored.restore_partition(0, &bytes, 0).expect("decodes");
    restored.restore_watermark(engine.watermark());
    assert_eq!(restored.entity_count(), engine.entity_count());
    for i in (0..30_000u32).step_by(997) {
        let id = format!("entity-{i}");
        assert_eq!(restored.lookup(&id), engine.lookup(&id), "{id}");
    }
    assert_eq!(restored.snapshot_partition(0).expect("encodes"), bytes);
    // A damaged snapshot is an error, not a panic.
    assert!(
        restored
            .restore_partition(1, &bytes[..bytes.len() / 2], 0)
            .is_err()
    );
}

/// Snapshots of formats 1 to 3 hold an older entity layout: restoring one is an error that says
/// what to do, never a misread state.
#[test]
fn snapshots_of_an_earlier_layout_are_refused_with_a_way_out() {
    let p = card_pipeline(
        "old_snapshots",
        "features:\n  - { name: n, agg: count, window: { sliding: 10m } }",
    );
    for version in [1u32, 2, 3] {
        let bytes = postcard::to_allocvec(&(version, Some(0i64), 0u64)).expect("encodes");
        let error = Engine::new(Arc::clone(&p))
            .restore_partition(0, &bytes, 0)
            .expect_err("an earlier format is refused");
        let text = error.to_string();
        assert!(
            text.contains(&format!("format version {version}"))
                && text.contains("earlier build")
                && text.contains("reset the consumer group's offsets"),
            "{text}"
        );
    }
}

#[test]
fn a_spread_that_overflows_is_null_never_zero() {
    let p = card_pipeline(
        "overflow",
        r#"
features:
  - { name: var, agg: variance, field: amount, window: lifetime }
  - { name: sd, agg: stddev, field: amount, window: { sliding: 10m } }
  - { name: sd_pop, agg: stddev_pop, field: amount, window: lifetime }
"#,
    );
    let mut engine = Engine::new(Arc::clone(&p));
    engine.assign(0, 0);
    let mut records = Vec::new();
    for (amount, at) in [(1e200, 0), (-1e200, 1_000)] {
        engine.process(0, &paid(1, amount, at).decoded(), 0, &mut records);
    }
    let (_, values) = engine.lookup("c1").expect("c1 has state");
    assert_eq!(
        values,
        vec![FeatureValue::Null; 3],
        "the squares of 2e200 overflow f64"
    );
}

/// A partition handed over from an instance that was behind keeps judging its events by its
/// own time: the new owner's watermark comes back to it, so they are not late for having
/// moved, and what its state already had due is emitted at the next tick.
#[test]
fn a_partition_handed_over_from_behind_is_not_late_for_having_moved() {
    let p = card_pipeline(
        "handover",
        r#"  watermark: { max_out_of_order: 5s }
features:
  - { name: n, agg: count, window: lifetime }
  - { name: n_10s, agg: count, window: { sliding: 10s } }
"#,
    );
    let second = 1_000;
    let hour = 3_600_000;
    // The previous owner of partition 1 saw card 2 until 0:00:20.
    let mut previous = Engine::new(Arc::clone(&p));
    previous.assign(1, 0);
    let mut records = Vec::new();
    for at in [0, 10, 20] {
        previous.process(1, &paid(2, 1.0, at * second).decoded(), 0, &mut records);
    }
    let handed_over = previous.snapshot_partition(1).expect("snapshot encodes");

    // The new owner is an hour ahead on its own partition.
    let mut owner = Engine::new(Arc::clone(&p));
    owner.assign(0, 0);
    owner.process(0, &paid(1, 1.0, hour).decoded(), 0, &mut records);
    assert_eq!(owner.watermark(), Some(hour - 5 * second));
    owner
        .restore_partition(1, &handed_over, 0)
        .expect("snapshot restores");
    assert_eq!(
        owner.watermark(),
        Some(20 * second - 5 * second),
        "the watermark comes back to the handed-over partition's"
    );
    let outcome = owner.process(1, &paid(2, 1.0, 21 * second).decoded(), 0, &mut records);
    assert_eq!(outcome, Outcome::Aggregated, "not late for having moved");
    let (_, values) = owner.lookup("c2").expect("card 2 came with its partition");
    assert_eq!(
        values[0],
        FeatureValue::Int(4),
        "its count went on from the state"
    );

    // A checkpoint from an instance further ahead, restored after that one, does not carry
    // the watermark past the partition restored first.
    let mut ahead = Engine::new(Arc::clone(&p));
    ahead.assign(3, 0);
    ahead.process(3, &paid(3, 1.0, 2 * hour).decoded(), 0, &mut records);
    let from_ahead = ahead.snapshot_partition(3).expect("snapshot encodes");
    owner.restore_watermark(ahead.watermark());
    owner
        .restore_partition(3, &from_ahead, 0)
        .expect("snapshot restores");
    assert_eq!(owner.watermark(), Some(21 * second - 5 * second));

    // A partition that arrives with no state holds the watermark back until it has data.
    owner.assign(2, 0);
    assert_eq!(owner.watermark(), None);
}

/// Windows that close, with entities expiring, for the sliced snapshot below.
const SLICED_CLOSE: &str = r#"
name: prop_sliced
source:
  kafka: { brokers: "127.0.0.1:9092", topic: t, group_id: g }
  schema: { card: string, merchant: string, amount: float?, status: string, ts: timestamp }
  entity: card
  event_time: ts
  watermark: { max_out_of_order: 3s }
  allowed_lateness: 2s
features:
  - { name: n_hop, agg: count, window: { hopping: 12s, step: 4s } }
  - { name: sum_tumble, agg: sum, field: amount, window: { tumbling: 7s } }
  - { name: distinct, agg: distinct_count, field: merchant, window: { hopping: 12s, step: 6s } }
  - { name: p90, agg: { percentile: 0.9 }, field: amount, window: { sliding: 8s, step: 2s } }
  - { name: sess_mean, agg: mean, field: amount, window: { session: 4s } }
sinks:
  kafka: { topic: out, emit: on_window_close }
state: { entity_ttl: 20s }
"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// A snapshot taken a slice at a time while events go on (with entities expiring and their
    /// slots reused meanwhile) is byte for byte the snapshot taken at once when it began.
    #[test]
    fn a_snapshot_taken_in_slices_is_the_snapshot_at_its_start(
        events in stream(),
        begin in 0usize..120,
        budgets in prop::collection::vec(0usize..3, 120),
        close_windows in any::<bool>(),
    ) {
        let text = if close_windows {
            SLICED_CLOSE.to_string()
        } else {
            ON_UPDATE.replace("entity_ttl: never", "entity_ttl: 20s")
        };
        let p = pipeline(&text);
        let begin = begin % events.len();
        let mut at_start = Engine::new(Arc::clone(&p));
        let mut sliced = Engine::new(Arc::clone(&p));
        at_start.assign(0, 0);
        sliced.assign(0, 0);
        let mut records = Vec::new();
        for ev in &events[..begin] {
            at_start.process(0, &ev.decoded(), 0, &mut records);
            sliced.process(0, &ev.decoded(), 0, &mut records);
        }
        let want = at_start.snapshot_partition(0).expect("encodes");
        sliced.begin_snapshot([0]);
        for (ev, budget) in events[begin..].iter().zip(&budgets) {
            sliced.process(0, &ev.decoded(), 0, &mut records);
            sliced.snapshot_step(*budget);
        }
        let mut finished = sliced.finish_snapshots();
        prop_assert_eq!(finished.len(), 1, "one partition, one snapshot");
        let (partition, capture) = finished.remove(0);
        prop_assert_eq!(partition, 0);
        prop_assert_eq!(capture.assemble().expect("encodes"), want);
        prop_assert!(sliced.finish_snapshots().is_empty(), "handed over once");
    }
}

/// The slice of a snapshot step is shared by all partitions: a step with room for one entity
/// encodes one entity, whatever the number of partitions.
#[test]
fn a_snapshot_slice_spans_partitions() {
    let p = pipeline(ON_UPDATE);
    let mut engine = Engine::new(Arc::clone(&p));
    engine.assign(0, 0);
    engine.assign(1, 0);
    let mut records = Vec::new();
    for (partition, card) in [(0, 0u8), (0, 1), (0, 2), (1, 3), (1, 4)] {
        let ev = paid(card, 10.0, 1_700_000_000_000 + i64::from(card));
        engine.process(partition, &ev.decoded(), 0, &mut records);
    }
    let want = [
        engine.snapshot_partition(0).unwrap(),
        engine.snapshot_partition(1).unwrap(),
    ];
    engine.begin_snapshot([0, 1]);
    let mut steps = 1;
    while !engine.snapshot_step(1) {
        steps += 1;
    }
    assert_eq!(steps, 5, "five entities, one per step");
    let finished = engine.finish_snapshots();
    assert_eq!(finished.len(), 2);
    for ((partition, capture), want) in finished.into_iter().zip(&want) {
        assert_eq!(&capture.assemble().unwrap(), want, "partition {partition}");
    }
}
