#!/usr/bin/env python3
"""Independent reference model of `featurestream replay` (emit: on_update), written from the
product specification's Semantics and Records sections alone (not from the engine's code), with
docs/semantics.md used only to settle choices the specification leaves open (order of work per
event, as_of of time-driven records, ties, etc.).

Usage: ref.py PIPELINE.yaml EVENTS.jsonl OUTDIR
Writes OUTDIR/expected.jsonl (records, each with an extra "_kind": own|time and "_line"),
OUTDIR/expected_rejected.jsonl, OUTDIR/expected_summary.json, OUTDIR/expected_final.json.
"""
import bisect
import datetime as dt
import json
import math
import re
import sys
from fractions import Fraction

import yaml

I64_MIN, I64_MAX = -(2 ** 63), 2 ** 63 - 1

# ---------------------------------------------------------------- durations / times
DUR = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_dur(s):
    if s is None:
        return None
    if isinstance(s, int):
        return s
    s = str(s).strip()
    if s == "never":
        return None
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", s)
    if not m:
        raise ValueError("bad duration %r" % s)
    return int(m.group(1)) * DUR[m.group(2)]


RFC = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$")


def parse_ts(v):
    """-> epoch ms, or raises TypeError (schema)."""
    if isinstance(v, bool):
        raise TypeError("bool for timestamp")
    if isinstance(v, int):
        if not (-62167219200000 <= v <= 253402300799999):
            raise TypeError("out of range")
        return v
    if isinstance(v, str):
        m = RFC.match(v)
        if not m:
            raise TypeError("bad rfc3339 %r" % v)
        y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
        if s == 60:
            s = 59
        frac = m.group(7) or ""
        ms = int((frac + "000")[:3])
        off = m.group(8)
        base = dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.timezone.utc)
        t = int(base.timestamp()) * 1000 + ms
        if off not in ("Z", "z"):
            sign = 1 if off[0] == "+" else -1
            oh, om = int(off[1:3]), int(off[4:6])
            t -= sign * (oh * 3600 + om * 60) * 1000
        return t
    raise TypeError("not a timestamp: %r" % (v,))


def fmt_ts(ms):
    d = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(milliseconds=ms)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (ms % 1000)


# ---------------------------------------------------------------- where: expressions
TOK = re.compile(r'\s*(?:(\()|(\))|(==|!=|<=|>=|<|>)|("(?:[^"\\]|\\.)*")|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|([A-Za-z_][A-Za-z0-9_]*))')


def tokenize(s):
    out, pos = [], 0
    s = s.strip()
    while pos < len(s):
        m = TOK.match(s, pos)
        if not m or m.end() == pos:
            raise ValueError("bad where at %d: %r" % (pos, s))
        pos = m.end()
        if m.group(1):
            out.append(("(", None))
        elif m.group(2):
            out.append((")", None))
        elif m.group(3):
            out.append(("op", m.group(3)))
        elif m.group(4):
            out.append(("lit", json.loads(m.group(4))))
        elif m.group(5):
            txt = m.group(5)
            out.append(("lit", float(txt) if any(c in txt for c in ".eE") else int(txt)))
        else:
            w = m.group(6)
            if w in ("and", "or", "not"):
                out.append((w, None))
            elif w in ("true", "false"):
                out.append(("lit", w == "true"))
            else:
                out.append(("id", w))
    return out


def parse_where(s):
    toks = tokenize(s)
    i = 0

    def peek():
        return toks[i][0] if i < len(toks) else None

    def p_or():
        nonlocal i
        l = p_and()
        while peek() == "or":
            i += 1
            r = p_and()
            l = ("or", l, r)
        return l

    def p_and():
        nonlocal i
        l = p_not()
        while peek() == "and":
            i += 1
            r = p_not()
            l = ("and", l, r)
        return l

    def p_not():
        nonlocal i
        if peek() == "not":
            i += 1
            return ("not", p_not())
        if peek() == "(":
            i += 1
            e = p_or()
            assert peek() == ")"
            i += 1
            return e
        assert peek() == "id", toks[i:]
        f = toks[i][1]
        i += 1
        if peek() != "op":  # bare bool field
            return ("cmp", f, "==", True)
        op = toks[i][1]
        i += 1
        assert peek() == "lit"
        lit = toks[i][1]
        i += 1
        return ("cmp", f, op, lit)

    e = p_or()
    assert i == len(toks)
    return e


def eval_where(e, ev):
    k = e[0]
    if k == "or":
        return eval_where(e[1], ev) or eval_where(e[2], ev)
    if k == "and":
        return eval_where(e[1], ev) and eval_where(e[2], ev)
    if k == "not":
        return not eval_where(e[1], ev)
    _, f, op, lit = e
    v = ev.get(f)
    if v is None:
        return False
    return {"==": v == lit, "!=": v != lit, "<": v < lit, "<=": v <= lit, ">": v > lit, ">=": v >= lit}[op]


# ---------------------------------------------------------------- aggregations
def fin(x):
    return x if (x is not None and math.isfinite(x)) else None


def tofloat(fr):
    try:
        return float(fr)
    except OverflowError:
        return None


def aggregate(agg, ftype, items):
    """items: list of (t, arrival, value) already filtered (where passed, value non-null unless
    count without field, where value is True). Returns the feature value (exact where possible)."""
    vals = [v for (_, _, v) in items]
    n = len(vals)
    if agg == "count":
        return n
    if agg == "distinct_count":
        return len(set(vals))
    if n == 0:
        return None
    if agg == "sum":
        if ftype == "int":
            s = sum(vals)
            return s if I64_MIN <= s <= I64_MAX else None
        return fin(tofloat(sum(Fraction(v) for v in vals)))
    if agg == "mean":
        return fin(tofloat(sum(Fraction(v) for v in vals) / n))
    if agg in ("min", "max"):
        return (min if agg == "min" else max)(vals)
    if agg in ("stddev", "variance", "stddev_pop", "variance_pop"):
        pop = agg.endswith("_pop")
        if not pop and n < 2:
            return None
        fr = [Fraction(v) for v in vals]
        mu = sum(fr) / n
        ss = sum((x - mu) ** 2 for x in fr)
        var = ss / (n if pop else n - 1)
        fv = tofloat(var)
        if agg.startswith("variance") or fv is None:
            return fin(fv)
        return fin(math.sqrt(fv))
    if agg == "first":
        best = min(items, key=lambda it: (it[0], it[1]))
        return best[2]
    if agg == "last":
        best = max(items, key=lambda it: (it[0], it[1]))
        return best[2]
    if agg.startswith("percentile:"):
        q = float(agg.split(":", 1)[1])
        s = sorted(vals)
        return float(s[int(math.floor(q * (n - 1)))])
    raise ValueError(agg)


# ---------------------------------------------------------------- pipeline
class Feature:
    def __init__(self, d, schema):
        self.name = d["name"]
        a = d["agg"]
        if isinstance(a, dict):
            self.agg = "percentile:%s" % a["percentile"]
        else:
            self.agg = a
        self.field = d.get("field")
        self.ftype = schema[self.field][0] if self.field else None
        self.where = parse_where(d["where"]) if d.get("where") else None
        w = d["window"]
        self.kind = None
        if w == "lifetime":
            self.kind = "lifetime"
        elif "session" in w:
            self.kind = "session"
            self.gap = parse_dur(w["session"])
        elif "tumbling" in w:
            self.kind = "win"
            self.size = self.step = parse_dur(w["tumbling"])
        elif "hopping" in w:
            self.kind = "win"
            self.size = parse_dur(w["hopping"])
            self.step = parse_dur(w["step"])
        elif "sliding" in w:
            self.kind = "win"
            self.size = parse_dur(w["sliding"])
            self.step = parse_dur(w["step"]) if "step" in w else 1
        else:
            raise ValueError(w)

    def item(self, ev):
        """(included, value) for this feature."""
        if self.where is not None and not eval_where(self.where, ev["v"]):
            return None
        if self.field is None:
            return (ev["t"], ev["arr"], True)
        v = ev["v"].get(self.field)
        if v is None:
            return None
        return (ev["t"], ev["arr"], v)


def load_pipeline(path):
    p = yaml.safe_load(open(path))
    src = p["source"]
    schema = {}
    for k, t in src["schema"].items():
        t = str(t)
        opt = t.endswith("?")
        schema[k] = (t.rstrip("?"), opt)
    wm = src.get("watermark") or {}
    cfg = {
        "name": p["name"],
        "schema": schema,
        "entity": src["entity"],
        "event_time": src["event_time"],
        "mooo": parse_dur(wm.get("max_out_of_order", "0s")),
        "lateness": parse_dur(src.get("allowed_lateness", "0s")),
        "on_late": src.get("on_late", "drop"),
        "ttl": parse_dur((p.get("state") or {}).get("entity_ttl", "7d")),
    }
    cfg["features"] = [Feature(f, schema) for f in p["features"]]
    return cfg


# ---------------------------------------------------------------- decoding
class Reject(Exception):
    def __init__(self, reason, msg=""):
        self.reason = reason
        self.msg = msg


def _reject_const(c):
    raise ValueError("non-finite constant %s" % c)


def decode(line, cfg):
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in line):
        raise Reject("malformed", "invalid UTF-8")
    try:
        obj = json.loads(line, parse_constant=_reject_const)
    except Exception as e:
        raise Reject("malformed", str(e))
    if not isinstance(obj, dict):
        raise Reject("malformed", "not an object")
    schema = cfg["schema"]
    vals = {}
    missing = []
    for k, (ty, opt) in schema.items():
        present = k in obj and obj[k] is not None
        if not present:
            if not opt or k in (cfg["entity"], cfg["event_time"]):
                missing.append(k)
            vals[k] = None
            continue
        v = obj[k]
        if ty == "string":
            if not isinstance(v, str):
                raise Reject("schema", k)
        elif ty == "int":
            if isinstance(v, bool) or not isinstance(v, int) or not (I64_MIN <= v <= I64_MAX):
                raise Reject("schema", k)
        elif ty == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise Reject("schema", k)
            v = float(v)
        elif ty == "bool":
            if not isinstance(v, bool):
                raise Reject("schema", k)
        elif ty == "timestamp":
            try:
                v = parse_ts(v)
            except TypeError as e:
                raise Reject("schema", "%s: %s" % (k, e))
        vals[k] = v
    if missing:
        raise Reject("missing_field", ",".join(missing))
    ent = vals[cfg["entity"]]
    if isinstance(ent, int):
        ent = str(ent)
    if ent == "":
        raise Reject("missing_field", "empty entity")
    return ent, vals[cfg["event_time"]], vals


# ---------------------------------------------------------------- engine model
class Entity:
    def __init__(self):
        self.events = []  # sorted by (t, arr)
        self.keys = []
        self.newest = None
        self.last = None  # last emitted features (list)


def values_as_of(cfg, ent, T, W):
    out = []
    for f in cfg["features"]:
        if f.kind == "win":
            start = (T // f.step) * f.step + f.step - f.size
            lo = bisect.bisect_left(ent.keys, (start, -1))
            hi = bisect.bisect_right(ent.keys, (T, float("inf")))
            items = [it for it in (f.item(e) for e in ent.events[lo:hi]) if it is not None]
            out.append(aggregate(f.agg, f.ftype, items))
        elif f.kind == "lifetime":
            items = [it for it in (f.item(e) for e in ent.events) if it is not None]
            out.append(aggregate(f.agg, f.ftype, items))
        else:  # session
            items = [it for it in (f.item(e) for e in ent.events) if it is not None]
            if not items:
                out.append(aggregate(f.agg, f.ftype, []))
                continue
            # items sorted by (t, arr) since events are; split where gap >= f.gap
            sess_start = 0
            for i in range(1, len(items)):
                if items[i][0] - items[i - 1][0] >= f.gap:
                    sess_start = i
            sess = items[sess_start:]
            last_t = sess[-1][0]
            if W is None or W <= last_t + f.gap:
                out.append(aggregate(f.agg, f.ftype, sess))
            else:
                out.append(aggregate(f.agg, f.ftype, []))
    return out


def run(cfg, lines):
    ents = {}
    order = []  # entity creation order (only for deterministic output)
    W = None
    max_t = None
    recs, rejected = [], []
    stats = {"read": 0, "aggregated": 0, "rejected": 0, "late": 0, "blank": 0}
    notes = []

    def emit(name, ent, T, vals, kind, line):
        ent.last = vals
        recs.append({"pipeline": cfg["name"], "entity": name, "as_of": fmt_ts(T),
                     "features": {f.name: v for f, v in zip(cfg["features"], vals)},
                     "_kind": kind, "_line": line, "_T": T})

    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\n").rstrip("\r")
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]
        if line.strip() == "":
            stats["blank"] += 1
            continue
        stats["read"] += 1
        try:
            name, t, vals = decode(line, cfg)
        except Reject as r:
            stats["rejected"] += 1
            rejected.append({"line": lineno, "reason": r.reason, "msg": r.msg})
            continue
        if W is not None and t < W - cfg["lateness"]:
            stats["late"] += 1
            if cfg["on_late"] == "dlq":
                rejected.append({"line": lineno, "reason": "late"})
            continue
        stats["aggregated"] += 1
        ent = ents.get(name)
        if ent is None:
            ent = ents[name] = Entity()
            order.append(name)
        ev = {"t": t, "arr": lineno, "v": vals}
        k = (t, lineno)
        i = bisect.bisect_right(ent.keys, k)
        ent.keys.insert(i, k)
        ent.events.insert(i, ev)
        ent.newest = t if ent.newest is None else max(ent.newest, t)
        own = values_as_of(cfg, ent, ent.newest, W)
        emit(name, ent, ent.newest, own, "own", lineno)
        if W is not None and ent.newest < W:
            v2 = values_as_of(cfg, ent, W, W)
            if v2 != own:
                emit(name, ent, W, v2, "time_after_own", lineno)
        max_t = t if max_t is None else max(max_t, t)
        newW = max_t - cfg["mooo"]
        if W is None or newW > W:
            W = newW
            for nm in list(order):
                e = ents.get(nm)
                if e is None:
                    continue
                T = max(e.newest, W)
                v = values_as_of(cfg, e, T, W)
                if v != e.last:
                    emit(nm, e, T, v, "time", lineno)
                if cfg["ttl"] is not None and W > e.newest + cfg["ttl"]:
                    del ents[nm]
                    order.remove(nm)
                    notes.append("expired %s at W=%s (line %d)" % (nm, fmt_ts(W), lineno))
    final = {}
    for nm in order:
        e = ents[nm]
        final[nm] = {"newest": e.newest, "features": {f.name: v for f, v in zip(cfg["features"], e.last)},
                     "last_as_of": [r for r in recs if r["entity"] == nm][-1]["_T"],
                     "as_of_now": max(e.newest, W)}
    return recs, rejected, stats, final, W, notes


def main():
    pipe, events, outdir = sys.argv[1:4]
    cfg = load_pipeline(pipe)
    with open(events, encoding="utf-8", errors="surrogateescape") as fh:
        lines = fh.readlines()
    recs, rejected, stats, final, W, notes = run(cfg, lines)
    import os
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "expected.jsonl"), "w") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")
    with open(os.path.join(outdir, "expected_rejected.jsonl"), "w") as fh:
        for r in rejected:
            fh.write(json.dumps(r) + "\n")
    json.dump(stats, open(os.path.join(outdir, "expected_summary.json"), "w"))
    json.dump({"W": W, "entities": final, "notes": notes}, open(os.path.join(outdir, "expected_final.json"), "w"))
    print("ref: %d records, %s, final W %s, %d expiries" % (len(recs), stats, fmt_ts(W) if W is not None else None, len(notes)))


if __name__ == "__main__":
    main()
