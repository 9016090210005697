#!/usr/bin/env python3
"""Random event generator for the cross-check.
Usage: gen.py SEED N OUT.jsonl [--out-of-order-ms X] [--late-ms Y] [--entities K] [--mean-gap-ms G]
Schema of every pipeline in pipelines/:
  acct: string, shop: string, amt: float, qty: int, kind: string, tip: float?, at: timestamp
"""
import argparse
import datetime as dt
import json
import random

BASE = 1772323200000 + 7 * 60_000 + 13_123  # 2026-03-01T00:07:13.123Z, not aligned


def iso(ms, style, rnd):
    d = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(milliseconds=ms)
    if style == 0:
        return d.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (ms % 1000)
    if style == 1:  # offset +02:00, microsecond fraction (truncated to ms)
        d2 = d + dt.timedelta(hours=2)
        return d2.strftime("%Y-%m-%dT%H:%M:%S.") + "%03d%03d+02:00" % (ms % 1000, rnd.randrange(1000))
    if style == 2:  # negative offset, lower-case t, no fraction when ms==0
        d2 = d - dt.timedelta(hours=5, minutes=30)
        frac = "" if ms % 1000 == 0 else ".%03d" % (ms % 1000)
        return d2.strftime("%Y-%m-%dt%H:%M:%S") + frac + "-05:30"
    return ms  # epoch ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("seed", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("out")
    ap.add_argument("--out-of-order-ms", type=int, default=5000)
    ap.add_argument("--late-ms", type=int, default=10000)
    ap.add_argument("--entities", type=int, default=5)
    ap.add_argument("--mean-gap-ms", type=int, default=20000)
    ap.add_argument("--bad-rate", type=float, default=0.03)
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    ents = ["a%d" % i for i in range(a.entities)]
    weights = [1.0 / (i + 1) for i in range(a.entities)]
    shops = ["s1", "s2", "s3", "s4", "s5", "s6", "s7"]
    kinds = ["ok", "ok", "ok", "declined", "pending"]
    clock = BASE
    prev_t = clock
    out = []
    for i in range(a.n):
        r = rnd.random()
        if r < 0.02:
            clock += rnd.randint(20 * 60_000, 3 * 3_600_000)  # long gap: sessions close, windows empty
        elif r < 0.06:
            clock += rnd.randint(0, 3)  # near ties
        else:
            clock += int(rnd.expovariate(1.0 / a.mean_gap_ms))
        t = clock
        r = rnd.random()
        if r < 0.25:  # out of order within max_out_of_order (+ a bit)
            t = clock - rnd.randint(0, int(a.out_of_order_ms * 1.3))
        elif r < 0.30:  # out of order up to beyond the allowed lateness
            t = clock - rnd.randint(0, a.out_of_order_ms + a.late_ms * 2)
        elif r < 0.33:
            t = prev_t  # exact tie with previous event
        elif r < 0.34:
            t = (clock // 600_000) * 600_000  # on a 10-minute boundary
        elif r < 0.345:
            t = (clock // 600_000) * 600_000 - 1
        prev_t = t
        ev = {}
        ev["acct"] = rnd.choices(ents, weights)[0]
        ev["shop"] = rnd.choice(shops)
        rr = rnd.random()
        if rr < 0.2:
            ev["amt"] = rnd.randint(-5, 300)  # int where float declared
        elif rr < 0.25:
            ev["amt"] = rnd.choice([50, 50.0, 100, 100.0, 0.5])  # duplicates for distinct/min/max
        else:
            ev["amt"] = round(rnd.uniform(-20, 400), 2)
        ev["qty"] = rnd.randint(0, 9)
        ev["kind"] = rnd.choice(kinds)
        rr = rnd.random()
        if rr < 0.4:
            ev["tip"] = round(rnd.uniform(0, 20), 3)
        elif rr < 0.5:
            ev["tip"] = None
        ev["at"] = iso(t, rnd.choice([0, 0, 0, 1, 2, 3, 3]), rnd)
        if rnd.random() < 0.2:
            ev["extra"] = {"nested": [1, 2, {"x": "y"}], "s": "ignored"}
        keys = list(ev.keys())
        rnd.shuffle(keys)
        line = json.dumps({k: ev[k] for k in keys})
        # bad lines (time kept moderate so they could not move the watermark anyway)
        if rnd.random() < a.bad_rate:
            kind = rnd.randrange(9)
            bad = dict(ev)
            bad["at"] = iso(t - 3_600_000, 0, rnd)  # older than the watermark: cannot move it
            line = json.dumps(bad)
            if kind == 0:
                line = line[: len(line) // 2]  # truncated -> malformed
            elif kind == 1:
                bad["amt"] = str(ev["amt"])  # string for float -> schema
                line = json.dumps(bad)
            elif kind == 2:
                bad["qty"] = 3.0  # fraction for int -> schema
                line = json.dumps(bad)
            elif kind == 3:
                del bad["acct"]  # missing entity
                line = json.dumps(bad)
            elif kind == 4:
                bad["acct"] = ""  # empty entity -> missing_field
                line = json.dumps(bad)
            elif kind == 5:
                del bad["at"]  # missing event time
                line = json.dumps(bad)
            elif kind == 6:
                bad["at"] = "yesterday"  # unparsable time -> schema
                line = json.dumps(bad)
            elif kind == 7:
                bad["tip"] = "3"  # string for optional float -> schema
                line = json.dumps(bad)
            else:
                line = "{not json at all"
            out.append(line)
            if rnd.random() < 0.3:
                out.append("")
            continue
        out.append(line)
    with open(a.out, "w") as fh:
        fh.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
