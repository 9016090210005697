#!/usr/bin/env python3
"""Compare `featurestream replay` output against ref.py.
Usage: compare.py PIPELINE.yaml EVENTS.jsonl WORKDIR [--no-run]
Runs the binary into WORKDIR/got, the reference into WORKDIR/ref, and compares:
  * per-entity record sequences (as_of + every feature value), own-event records and time-driven ones
  * rejected.jsonl reasons / lines, summary.json counts and reconciliation
  * the final Parquet snapshot against the last record of each entity
  * the Parquet feature log (if any) against features.jsonl
Prints a report; exit 0 when everything matches. The binary is $FEATURESTREAM_BIN.
"""
import glob
import json
import math
import os
import subprocess
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.environ.get("FEATURESTREAM_BIN", "featurestream")
sys.path.insert(0, HERE)
import ref  # noqa: E402

REL = 1e-9
ABS = 1e-12


def close(a, b):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=REL, abs_tol=ABS)
    return a == b


def feat_close(f, exp, got):
    if f.agg.startswith("percentile:") and exp is not None and got is not None:
        x = 0.0 if abs(exp) < 1e-9 else exp
        return abs(got - x) <= 0.01 * abs(x) + 1e-12
    return close(exp, got)


def main():
    pipe, events, work = sys.argv[1:4]
    norun = "--no-run" in sys.argv
    cfg = ref.load_pipeline(pipe)
    os.makedirs(work, exist_ok=True)
    gotdir = os.path.join(work, "got")
    refdir = os.path.join(work, "ref")
    if not norun:
        p = subprocess.run([BIN, "replay", pipe, "--input", events, "--output", gotdir],
                           capture_output=True, text=True)
        open(os.path.join(work, "replay.stdout"), "w").write(p.stdout)
        open(os.path.join(work, "replay.stderr"), "w").write(p.stderr)
        if p.returncode != 0:
            print("replay exit code", p.returncode, p.stderr[-2000:])
    with open(events, encoding="utf-8", errors="surrogateescape") as fh:
        lines = fh.readlines()
    recs, rejected, stats, final, W, notes = ref.run(cfg, lines)
    os.makedirs(refdir, exist_ok=True)
    with open(os.path.join(refdir, "expected.jsonl"), "w") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")

    problems = []
    got = [json.loads(l) for l in open(os.path.join(gotdir, "features.jsonl")) if l.strip()]
    # --- record shape
    names = [f.name for f in cfg["features"]]
    for g in got:
        if list(g.keys()) != ["pipeline", "entity", "as_of", "features"]:
            problems.append(("shape", "record keys %s" % list(g.keys())))
            break
        if list(g["features"].keys()) != names:
            problems.append(("shape", "feature order %s" % list(g["features"].keys())))
            break
        if g["pipeline"] != cfg["name"]:
            problems.append(("shape", "pipeline %s" % g["pipeline"]))
            break
    # --- per-entity sequences
    E = defaultdict(list)
    G = defaultdict(list)
    for r in recs:
        E[r["entity"]].append(r)
    for g in got:
        G[g["entity"]].append(g)
    n_cmp = n_own = n_time = 0
    first_div = {}
    for ent in sorted(set(E) | set(G)):
        e, g = E.get(ent, []), G.get(ent, [])
        for i in range(max(len(e), len(g))):
            if i >= len(e) or i >= len(g):
                first_div[ent] = (i, e[i] if i < len(e) else None, g[i] if i < len(g) else None)
                break
            ok = e[i]["as_of"] == g[i]["as_of"]
            bad = [] if ok else ["as_of"]
            for f in cfg["features"]:
                if not feat_close(f, e[i]["features"][f.name], g[i]["features"].get(f.name)):
                    bad.append(f.name)
            if bad:
                first_div[ent] = (i, e[i], g[i], bad)
                break
            n_cmp += 1
            if e[i]["_kind"] == "own":
                n_own += 1
            else:
                n_time += 1
    # own-event subset: align by own records (each own record's as_of is the entity's newest time)
    own_total = 0
    for ent in E:
        own = [r for r in E[ent] if r["_kind"] == "own"]
        own_total += len(own)
    for ent, d in first_div.items():
        problems.append(("sequence", ent, d))
    # --- rejected
    try:
        grej = [json.loads(l) for l in open(os.path.join(gotdir, "rejected.jsonl")) if l.strip()]
    except FileNotFoundError:
        grej = None
        problems.append(("rejected", "no rejected.jsonl"))
    if grej is not None:
        exp_r = [(r["line"], r["reason"]) for r in rejected]
        got_r = [(r.get("line"), r.get("reason")) for r in grej]
        if exp_r != got_r:
            se, sg = set(exp_r), set(got_r)
            problems.append(("rejected", "only expected: %s; only got: %s" % (sorted(se - sg)[:10], sorted(sg - se)[:10])))
    # --- summary
    summ = json.load(open(os.path.join(gotdir, "summary.json")))
    for k in ("read", "aggregated", "rejected", "late"):
        if summ.get(k) != stats[k]:
            problems.append(("summary", k, stats[k], summ.get(k)))
    if summ.get("read") != summ.get("aggregated", 0) + summ.get("rejected", 0) + summ.get("late", 0):
        problems.append(("summary", "reconciliation fails", summ))
    # --- parquet snapshot
    snap_rows = 0
    try:
        import pyarrow.parquet as pq
        files = [f for f in glob.glob(os.path.join(gotdir, "parquet", cfg["name"], "**", "*.parquet"), recursive=True)]
        if not files:
            problems.append(("parquet", "no snapshot file"))
        else:
            tbl = pq.read_table(files[0]) if len(files) == 1 else None
            if tbl is None:
                problems.append(("parquet", "%d snapshot files" % len(files)))
            else:
                rows = tbl.to_pylist()
                snap_rows = len(rows)
                cols = tbl.column_names
                exp_cols = ["entity"] + names + ["as_of", "snapshot_time"]
                if cols != exp_cols:
                    problems.append(("parquet", "columns %s" % cols))
                byent = {r["entity"]: r for r in rows}
                if set(byent) != set(final):
                    problems.append(("parquet", "entities only expected %s only got %s" % (sorted(set(final) - set(byent)), sorted(set(byent) - set(final)))))
                for ent, fe in final.items():
                    r = byent.get(ent)
                    if r is None:
                        continue
                    asof = r["as_of"]
                    asof_ms = int(asof.timestamp() * 1000) if hasattr(asof, "timestamp") else asof
                    if asof_ms not in (fe["last_as_of"], fe["as_of_now"]):
                        problems.append(("parquet", ent, "as_of", ref.fmt_ts(asof_ms), ref.fmt_ts(fe["last_as_of"]), ref.fmt_ts(fe["as_of_now"])))
                    for f in cfg["features"]:
                        gv = r[f.name]
                        if hasattr(gv, "timestamp"):
                            gv = ref.fmt_ts(int(gv.timestamp() * 1000))
                        if not feat_close(f, fe["features"][f.name], gv):
                            problems.append(("parquet", ent, f.name, fe["features"][f.name], gv))
                    # also the parquet row must equal the last features.jsonl record of the entity
                    if G.get(ent):
                        lastg = G[ent][-1]["features"]
                        for f in cfg["features"]:
                            gv = r[f.name]
                            if hasattr(gv, "timestamp"):
                                gv = ref.fmt_ts(int(gv.timestamp() * 1000))
                            if not close(lastg[f.name], gv) and not (f.agg.startswith("percentile") and close(float(lastg[f.name]), gv)):
                                problems.append(("parquet-vs-jsonl", ent, f.name, lastg[f.name], gv))
        # feature log
        logs = glob.glob(os.path.join(gotdir, "parquet", cfg["name"] + "-updates", "**", "*.parquet"), recursive=True)
        if logs:
            import pyarrow as pa
            t = pa.concat_tables([pq.read_table(f) for f in sorted(logs)])
            if t.num_rows != len(got):
                problems.append(("feature_log", "rows %d vs features.jsonl %d" % (t.num_rows, len(got))))
    except ImportError:
        problems.append(("parquet", "pyarrow missing"))

    print("pipeline %s events %s: read %d, expected records %d (own %d), got %d; compared-equal %d (own %d, time %d); snapshot rows %d" % (
        cfg["name"], os.path.basename(events), stats["read"], len(recs), own_total, len(got), n_cmp, n_own, n_time, snap_rows))
    print("  ref summary", stats, "got summary", summ)
    for p in problems:
        print("  MISMATCH", json.dumps(p, default=str)[:3000])
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
