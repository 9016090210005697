"""Reads featurestream's Parquet snapshots with pyarrow, as a training job would.

usage: check_parquet.py SNAPSHOT_ROOT PIPELINE EXPECTED_JSON [--poll SECONDS]

EXPECTED_JSON maps entity -> lifetime count (`total`). With --poll, every file that appears in
the folder during that time is opened and read completely (a half-written file would fail).
Prints a JSON summary; exits non-zero on any mismatch.
"""
import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq


def main() -> int:
    root, pipeline, expected_path = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    poll = float(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "--poll" else 0.0
    expected = json.loads(Path(expected_path).read_text())
    folder = root / pipeline
    seen = set()
    deadline = time.time() + poll
    reads = 0
    while True:
        for f in folder.rglob("*.parquet"):
            if f.name.startswith("."):
                continue
            pq.read_table(f)  # raises on a partial or corrupt file
            reads += 1
            seen.add(f)
        if time.time() >= deadline:
            break
        time.sleep(0.05)
    if not seen:
        print(f"no snapshot files under {folder}", file=sys.stderr)
        return 1
    dataset = ds.dataset(folder, format="parquet", partitioning="hive")
    table = dataset.to_table()
    schema = table.schema
    problems = []
    want_types = {
        "entity": pa.string(),
        "total": pa.int64(),
        "n_10m": pa.int64(),
        "sum_1h": pa.float64(),
        "as_of": pa.timestamp("ms", tz="UTC"),
        "snapshot_time": pa.timestamp("ms", tz="UTC"),
    }
    for name, ty in want_types.items():
        if schema.field(name).type != ty:
            problems.append(f"column {name} is {schema.field(name).type}, expected {ty}")
    newest = max(seen, key=lambda f: int(f.stem.split("-")[1]))
    latest = pq.read_table(newest).to_pylist()
    totals = {row["entity"]: row["total"] for row in latest}
    for entity, count in expected.items():
        if totals.get(entity) != count:
            problems.append(f"{entity}: total {totals.get(entity)} in {newest.name}, expected {count}")
    print(json.dumps({"files": len(seen), "reads": reads, "rows_newest": len(latest), "problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
