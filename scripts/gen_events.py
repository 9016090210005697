#!/usr/bin/env python3
"""Deterministic event generator for the featurestream example pipelines.

Writes one JSON event per line (JSONL) to stdout, for:

  card         pipelines/card_fraud.yaml    card authorisations, entity card_id
  clickstream  pipelines/clickstream.yaml   web-shop user activity, entity user_id
  bids         pipelines/auction_bids.yaml  Nexmark-style bids, entity auction

Usage:
  python3 scripts/gen_events.py {card|clickstream|bids} --events N --entities K --seed S
      [--start 2026-03-01T00:00:00Z] [--rate-per-sec R]
      [--bad-fraction F] [--late-fraction F] [--summary]

Properties (relied on by tests and benchmarks):
  * Same arguments -> byte-identical output (Python standard library only; the random number
    streams are seeded from --seed alone).
  * Event times start at --start and advance with Poisson arrivals at --rate-per-sec.
    About 10% of events are shifted back by a small jitter that stays well inside the
    pipeline's watermark max_out_of_order (card 2s of 5s, clickstream 3s of 10s, bids 400ms of
    1s), so jitter alone never makes an event late.
  * --bad-fraction of the lines are malformed, in three equally likely ways: not JSON
    (truncated record or a stray text line), a string where a number is declared, or the entity
    field missing. These must be dead-lettered as malformed / schema / missing_field.
  * --late-fraction of the lines are otherwise valid events whose time is far in the past:
    before --start by more than the pipeline's max_out_of_order + allowed_lateness (card
    10m-3h, clickstream 10m-2h, bids 1m-10m). A late line is only written after at least one
    valid line, so it is late in a single-partition replay, and in Kafka as soon as every
    partition has seen an event. Late lines requested before the first valid line are
    deferred, so the requested count is still met.
  * Faults are drawn from their own random stream and only replace the line they hit, so the
    valid events are the same with or without faults (apart from the lines replaced).
  * Entity keys, merchants, products and bidders are Zipf-skewed (a few hot keys).
  * --summary prints counts (valid, bad by kind, late) as JSON to stderr, for reconciliation.
"""

import argparse
import bisect
import datetime as dt
import json
import math
import os
import random
import sys

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

# Per kind: default rate, jitter bound (ms, well inside max_out_of_order), the range of how far
# in the past a late event is (ms), and the lateness horizon of the pipeline
# (max_out_of_order + allowed_lateness, ms) used to make sure a late line really is late.
KINDS = {
    "card": dict(rate=1.0, jitter_ms=2_000, late_ms=(10 * 60_000, 3 * 3_600_000),
                 horizon_ms=5_000 + 30_000),
    "clickstream": dict(rate=2.0, jitter_ms=3_000, late_ms=(10 * 60_000, 2 * 3_600_000),
                        horizon_ms=10_000 + 60_000),
    "bids": dict(rate=50.0, jitter_ms=400, late_ms=(60_000, 10 * 60_000),
                 horizon_ms=1_000 + 0),
}
JITTER_PROBABILITY = 0.10


def parse_time(text):
    """RFC 3339 / ISO 8601 to epoch milliseconds (naive times are UTC)."""
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    try:
        t = dt.datetime.fromisoformat(s)
    except ValueError:
        raise argparse.ArgumentTypeError("not an RFC 3339 time: %r" % text)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    delta = t - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def rfc3339_ms(ms):
    t = EPOCH + dt.timedelta(milliseconds=ms)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + ".%03dZ" % (ms % 1000)


def dumps(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def money(x):
    """Round to cents; whole amounts are written as JSON integers, as JavaScript producers do
    (an int is accepted where a float is declared)."""
    cents = max(1, int(round(x * 100)))
    return cents // 100 if cents % 100 == 0 else cents / 100


class Zipf:
    """Ranks 0..n-1 with P(rank k) proportional to 1 / (k + 1) ** s."""

    def __init__(self, n, s):
        total, cum = 0.0, []
        for k in range(n):
            total += 1.0 / (k + 1) ** s
            cum.append(total)
        self.cum, self.total = cum, total

    def sample(self, rng):
        return min(bisect.bisect_left(self.cum, rng.random() * self.total), len(self.cum) - 1)


class KeyPool:
    """Zipf-skewed keys whose hotness is shuffled, so the hottest key is not always id 0."""

    def __init__(self, rng, keys, s):
        self.keys = list(keys)
        rng.shuffle(self.keys)
        self.zipf = Zipf(len(self.keys), s)

    def pick(self, rng):
        return self.keys[self.zipf.sample(rng)]


# --------------------------------------------------------------------------------------------
# Card authorisations
# --------------------------------------------------------------------------------------------

# (merchant category code, median amount in USD, log-normal sigma, share of merchants)
MCCS = [
    ("5411", 38.0, 0.8, 0.18),   # grocery
    ("5812", 27.0, 0.6, 0.16),   # restaurants
    ("5814", 9.5, 0.5, 0.12),    # fast food
    ("5541", 45.0, 0.4, 0.10),   # fuel
    ("5999", 55.0, 1.0, 0.14),   # misc retail
    ("5732", 180.0, 1.0, 0.05),  # electronics
    ("4121", 18.0, 0.5, 0.08),   # taxis / rideshare
    ("5691", 75.0, 0.8, 0.08),   # clothing
    ("7011", 240.0, 0.7, 0.04),  # hotels
    ("4511", 420.0, 0.6, 0.02),  # airlines
    ("6011", 100.0, 0.6, 0.03),  # ATM cash
]
COUNTRIES = [("US", 0.86), ("CA", 0.04), ("GB", 0.03), ("MX", 0.03), ("DE", 0.02), ("FR", 0.02)]


def weighted(rng, pairs):
    r = rng.random() * sum(w for _, w in pairs)
    for value, w in pairs:
        r -= w
        if r < 0:
            return value
    return pairs[-1][0]


class CardGen:
    entity_field = "card_id"
    number_field = "amount"
    time_field = "ts"
    format_time = staticmethod(rfc3339_ms)

    def __init__(self, rng, entities):
        self.cards = KeyPool(rng, ["card_%06d" % i for i in range(entities)], 0.7)
        n_merchants = max(50, entities * 4)
        self.merchants = KeyPool(rng, ["m_%06d" % i for i in range(n_merchants)], 1.1)
        self.merchant_info = {}
        for m in self.merchants.keys:
            mcc = weighted(rng, [(c, c[3]) for c in MCCS])
            channel = "ecom" if rng.random() < 0.3 else "pos"
            country = weighted(rng, COUNTRIES)
            self.merchant_info[m] = (mcc, channel, country)
        self.seq = 0

    def event(self, rng, ts_ms):
        self.seq += 1
        merchant = self.merchants.pick(rng)
        (mcc, median, sigma, _), channel, country = self.merchant_info[merchant]
        amount = money(rng.lognormvariate(math.log(median), sigma))
        p_decline = 0.03 + (0.05 if amount > 500 else 0.0) + (0.02 if channel == "ecom" else 0.0)
        status = "declined" if rng.random() < p_decline else "approved"
        return {
            "txn_id": "txn_%010d" % self.seq,
            "card_id": self.cards.pick(rng),
            "merchant_id": merchant,
            "amount": amount,
            "currency": "USD",
            "mcc": mcc,
            "country": country,
            "channel": channel,
            "status": status,
            "ts": rfc3339_ms(ts_ms),
        }

    @staticmethod
    def text_line(rng, ev):
        return "%s %s,%s,%s,%s" % (
            ev["ts"], ev.get("card_id", "card_?"), ev["merchant_id"], ev["amount"], ev["status"])


# --------------------------------------------------------------------------------------------
# Clickstream
# --------------------------------------------------------------------------------------------

DEVICES = [("ios", 0.34), ("android", 0.30), ("desktop", 0.30), ("tablet", 0.06)]
CATEGORIES = ["shoes", "electronics", "home", "toys", "beauty", "books", "sports", "garden"]
SEARCHES = ["running shoes", "usb c cable", "coffee maker", "lego", "sunscreen", "desk lamp",
            "yoga mat", "headphones", "backpack", "air fryer"]
SESSION_GAP_MS = 30 * 60_000


class ClickGen:
    entity_field = "user_id"
    number_field = "price"
    time_field = "ts"
    format_time = staticmethod(rfc3339_ms)

    def __init__(self, rng, entities):
        self.users = KeyPool(rng, ["user_%06d" % i for i in range(entities)], 0.8)
        n_products = max(100, entities * 2)
        self.products = KeyPool(rng, ["P%05d" % i for i in range(n_products)], 1.0)
        self.price = {p: money(rng.lognormvariate(math.log(35.0), 0.9)) for p in self.products.keys}
        self.device = {u: weighted(rng, DEVICES) for u in self.users.keys}
        self.state = {}   # user -> [session_id, last_ts, last_product, cart_total]

    def event(self, rng, ts_ms):
        user = self.users.pick(rng)
        st = self.state.get(user)
        restart = rng.random() < 0.01   # drawn every time: keeps the random stream aligned
        if st is None or ts_ms - st[1] >= SESSION_GAP_MS or restart:
            st = ["sess_%012x" % rng.getrandbits(48), ts_ms, None, 0.0]
            self.state[user] = st
        st[1] = max(st[1], ts_ms)
        device = self.device[user]
        if rng.random() < 0.03:   # occasionally the same user on another device
            device = weighted(rng, DEVICES)

        r = rng.random()
        if st[2] is not None and st[3] > 0 and r < 0.03:
            event_type = "purchase"
        elif st[2] is not None and r < 0.10:
            event_type = "add_to_cart"
        elif r < 0.40:
            event_type = "click"
        else:
            event_type = "view"

        price = None
        if event_type == "purchase":
            page = "/checkout/confirm"
            price = money(st[3])
            st[3] = 0.0
        elif event_type == "add_to_cart":
            page = "/product/" + st[2]
            price = self.price[st[2]]
            st[3] += price
        else:
            k = rng.random()
            if k < 0.55:
                product = self.products.pick(rng)
                st[2] = product
                page = "/product/" + product
                price = self.price[product] if event_type == "view" else None
            elif k < 0.75:
                page = "/c/" + rng.choice(CATEGORIES)
            elif k < 0.88:
                page = "/search?q=" + rng.choice(SEARCHES).replace(" ", "+")
            elif k < 0.96:
                page = "/"
            else:
                page = "/cart"
        ev = {
            "user_id": user,
            "session_id": st[0],
            "page": page,
            "event_type": event_type,
        }
        if price is not None:
            ev["price"] = price
        elif event_type == "click" and rng.random() < 0.2:
            ev["price"] = None   # some trackers send an explicit null
        ev["device"] = device
        ev["ts"] = rfc3339_ms(ts_ms)
        return ev

    @staticmethod
    def text_line(rng, ev):
        return '%s GET %s 200 "%s" user=%s' % (
            ev["ts"], ev["page"], ev["device"], ev.get("user_id", "-"))


# --------------------------------------------------------------------------------------------
# Nexmark-style bids
# --------------------------------------------------------------------------------------------

CHANNELS = [("Google", 0.4), ("Facebook", 0.3), ("Baidu", 0.2), ("Apple", 0.1)]
FIRST_AUCTION_ID = 1000   # Nexmark's first auction / person ids
FIRST_PERSON_ID = 1000


class BidGen:
    entity_field = "auction"
    number_field = "price"
    time_field = "date_time"
    format_time = staticmethod(int)

    def __init__(self, rng, entities):
        ids = range(FIRST_AUCTION_ID, FIRST_AUCTION_ID + entities)
        self.auctions = KeyPool(rng, ids, 1.0)
        n_people = max(50, entities * 5)
        self.bidders = KeyPool(rng, range(FIRST_PERSON_ID, FIRST_PERSON_ID + n_people), 0.8)
        # Current price per auction in cents, starting from a log-normal reserve.
        self.price = {a: max(100, int(rng.lognormvariate(math.log(5_000), 1.0))) for a in ids}

    def event(self, rng, ts_ms):
        auction = self.auctions.pick(rng)
        price = self.price[auction]
        if rng.random() < 0.85:   # most bids outbid the current price by 1-5%
            price = price + max(1, int(price * rng.uniform(0.01, 0.05)))
            self.price[auction] = price
        else:                     # the rest are at or below it (losing bids)
            price = max(1, int(price * rng.uniform(0.9, 1.0)))
        channel = weighted(rng, CHANNELS)
        url = "https://www.nexmark.com/%s/item.htm?query=1&channel_id=%d" % (
            channel.lower(), rng.randrange(1 << 10))
        return {
            "auction": auction,
            "bidder": self.bidders.pick(rng),
            "price": price,
            "channel": channel,
            "url": url,
            "date_time": ts_ms,   # epoch milliseconds (the other format a timestamp accepts)
        }

    @staticmethod
    def text_line(rng, ev):
        return "bid auction=%s bidder=%s price=%s" % (
            ev.get("auction", "?"), ev["bidder"], ev["price"])


GENERATORS = {"card": CardGen, "clickstream": ClickGen, "bids": BidGen}


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------

def malformed(rng, gen, ev):
    """Returns (kind, line) for a bad line derived from the valid event ev."""
    kind = rng.choice(["not_json", "string_number", "missing_entity"])
    if kind == "not_json":
        if rng.random() < 0.7:
            full = dumps(ev)   # a record cut short (producer crash, buffer truncation)
            return kind, full[: rng.randrange(8, len(full) - 1)]
        return kind, gen.text_line(rng, ev)   # a stray non-JSON line in the topic
    if kind == "string_number":
        bad = dict(ev)
        value = ev.get(gen.number_field)
        bad[gen.number_field] = (
            rng.choice(["N/A", "", "12,50", "USD 19.99"]) if value is None or rng.random() < 0.4
            else str(value))
        return kind, dumps(bad)
    bad = {k: v for k, v in ev.items() if k != gen.entity_field}
    return kind, dumps(bad)


# --------------------------------------------------------------------------------------------

def fraction(text):
    f = float(text)
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return f


def positive_int(text):
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Deterministic JSONL events for the featurestream example pipelines.")
    p.add_argument("kind", choices=sorted(GENERATORS))
    p.add_argument("--events", type=positive_int, required=True, help="lines to write")
    p.add_argument("--entities", type=positive_int, required=True,
                   help="number of distinct entity keys (cards, users, auctions)")
    p.add_argument("--seed", type=int, required=True, help="random seed (same arguments, same output)")
    p.add_argument("--start", type=parse_time, default=parse_time("2026-03-01T00:00:00Z"),
                   help="event time of the first event (RFC 3339, default 2026-03-01T00:00:00Z)")
    p.add_argument("--rate-per-sec", type=float, default=None,
                   help="mean events per second of event time (default: card 1, "
                        "clickstream 2, bids 50)")
    p.add_argument("--bad-fraction", type=fraction, default=0.0,
                   help="fraction of malformed lines (default 0)")
    p.add_argument("--late-fraction", type=fraction, default=0.0,
                   help="fraction of late events (default 0)")
    p.add_argument("--summary", action="store_true",
                   help="print line counts as JSON to stderr")
    a = p.parse_args(argv)
    if a.entities < 1:
        p.error("--entities must be at least 1")
    if a.bad_fraction + a.late_fraction > 1.0:
        p.error("--bad-fraction + --late-fraction must not exceed 1")
    cfg = KINDS[a.kind]
    rate = cfg["rate"] if a.rate_per_sec is None else a.rate_per_sec
    if not rate > 0:
        p.error("--rate-per-sec must be positive")

    # Independent streams: setup, event content, arrival times, faults.
    base = a.seed * 1_000_003 + 10 * sorted(GENERATORS).index(a.kind)
    gen = GENERATORS[a.kind](random.Random(base + 1), a.entities)
    content, clock, faults = random.Random(base + 2), random.Random(base + 3), random.Random(base + 4)

    out = sys.stdout
    counts = {"lines": 0, "valid": 0, "jittered": 0, "late": 0, "bad": 0,
              "bad_not_json": 0, "bad_string_number": 0, "bad_missing_entity": 0}
    now = float(a.start)          # event-time clock, ms
    max_valid = None              # newest event time among the valid lines written so far
    late_owed = 0
    lo, hi = cfg["late_ms"]
    for _ in range(a.events):
        now += clock.expovariate(rate) * 1000.0
        ts = int(now)
        if clock.random() < JITTER_PROBABILITY:
            ts = max(a.start, ts - clock.randint(1, cfg["jitter_ms"]))
            jittered = True
        else:
            jittered = False
        r = faults.random()
        is_bad = r < a.bad_fraction
        if not is_bad and r < a.bad_fraction + a.late_fraction:
            late_owed += 1
        late_ts = None
        if not is_bad and late_owed and max_valid is not None:
            # Dated before --start (by more than max_out_of_order + allowed_lateness), and
            # certainly older than (newest valid time - max_out_of_order - allowed_lateness).
            candidate = min(ts, a.start) - faults.randint(lo, hi)
            if candidate < max_valid - cfg["horizon_ms"] - 1_000:
                late_ts = candidate
                late_owed -= 1
        ev = gen.event(content, ts)
        if late_ts is not None:   # an old event delivered now: same content, old time
            ev[gen.time_field] = gen.format_time(late_ts)
        if is_bad:
            kind, line = malformed(faults, gen, ev)
            counts["bad"] += 1
            counts["bad_" + kind] += 1
        else:
            line = dumps(ev)
            if late_ts is not None:
                counts["late"] += 1
            else:
                counts["valid"] += 1
                counts["jittered"] += jittered
                max_valid = ts if max_valid is None else max(max_valid, ts)
        out.write(line)
        out.write("\n")
        counts["lines"] += 1
    out.flush()
    if a.summary:
        counts["first_time"] = rfc3339_ms(a.start)
        counts["last_time"] = rfc3339_ms(int(now))
        if late_owed:
            counts["late_not_placed"] = late_owed
        sys.stderr.write(dumps(counts) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:   # e.g. piped into head: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
