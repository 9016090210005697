//! Realistic card-transaction events for `demo` and the benchmarks: Zipf-skewed cards and
//! merchants, log-normal amounts, ~4% declines, small out-of-order jitter, and on request a
//! fraction of malformed and late events. Deterministic for a seed.

use crate::decode::time::format_rfc3339_ms;

/// xorshift64*: small, fast and deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf(s) over `n` ranks, sampled by inverse CDF.
pub struct Zipf(Vec<f64>);

impl Zipf {
    pub fn new(n: usize, s: f64) -> Zipf {
        let mut total = 0.0;
        let mut cdf: Vec<f64> = (1..=n.max(1))
            .map(|k| {
                total += 1.0 / (k as f64).powf(s);
                total
            })
            .collect();
        for c in &mut cdf {
            *c /= total;
        }
        Zipf(cdf)
    }
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.0.partition_point(|c| *c < u).min(self.0.len() - 1)
    }
}

pub struct CardEvents {
    rng: Rng,
    cards: Zipf,
    merchants: Zipf,
    start_ms: i64,
    rate_per_sec: f64,
    index: u64,
    pub bad_fraction: f64,
    pub late_fraction: f64,
}

const COUNTRIES: [&str; 10] = ["US", "GB", "DE", "FR", "NL", "ES", "IT", "BR", "IN", "JP"];

/// What kind of line a generated event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Valid,
    Malformed,
    WrongType,
    MissingEntity,
    Late,
}

impl CardEvents {
    /// `entities` cards, events `rate_per_sec` apart in event time starting at `start_ms`.
    pub fn new(seed: u64, entities: usize, start_ms: i64, rate_per_sec: f64) -> CardEvents {
        CardEvents {
            rng: Rng::new(seed),
            cards: Zipf::new(entities, 0.9),
            merchants: Zipf::new(20_000, 1.1),
            start_ms,
            rate_per_sec: rate_per_sec.max(0.001),
            index: 0,
            bad_fraction: 0.0,
            late_fraction: 0.0,
        }
    }

    /// The next event: its key (card id), JSON payload and kind.
    pub fn next_event(&mut self) -> (String, String, Kind) {
        let rng = &mut self.rng;
        let card = format!("card_{:06}", self.cards.sample(rng));
        let jitter = (rng.next_u64() % 3000) as i64;
        let mut ts =
            self.start_ms + (self.index as f64 * 1000.0 / self.rate_per_sec) as i64 - jitter;
        self.index += 1;
        let amount = ((rng.unit() * 4.0).exp() * 100.0).round() / 100.0;
        let status = if rng.next_u64().is_multiple_of(25) {
            "declined"
        } else {
            "approved"
        };
        let merchant = self.merchants.sample(rng);
        let country = COUNTRIES[(rng.next_u64() % 10) as usize];
        let device = rng.next_u64() as u32;
        let roll = rng.unit();
        let mut kind = Kind::Valid;
        if roll < self.bad_fraction {
            kind = match rng.next_u64() % 3 {
                0 => Kind::Malformed,
                1 => Kind::WrongType,
                _ => Kind::MissingEntity,
            };
        } else if roll < self.bad_fraction + self.late_fraction && self.index > 100 {
            kind = Kind::Late;
            ts -= 3_600_000;
        }
        let time = format_rfc3339_ms(ts);
        let payload = match kind {
            Kind::Malformed => {
                format!(r#"{{"card_id":"{card}","merchant_id":"m_{merchant:05}","amount":"#)
            }
            Kind::WrongType => format!(
                r#"{{"card_id":"{card}","merchant_id":"m_{merchant:05}","amount":"{amount}","status":"{status}","ts":"{time}"}}"#
            ),
            Kind::MissingEntity => {
                format!(
                    r#"{{"merchant_id":"m_{merchant:05}","amount":{amount},"status":"{status}","ts":"{time}"}}"#
                )
            }
            Kind::Valid | Kind::Late => format!(
                r#"{{"card_id":"{card}","merchant_id":"m_{merchant:05}","amount":{amount},"currency":"EUR","status":"{status}","country":"{country}","channel":"ecommerce","device_id":"dev_{device:08x}","ts":"{time}"}}"#
            ),
        };
        (card, payload, kind)
    }
}
