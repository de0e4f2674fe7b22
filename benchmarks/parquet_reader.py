"""Benchmark: the cost of one Ray Data read of Parquet shards, through each of Ray 2.60's two read paths.

    .venv/bin/python benchmarks/parquet_reader.py [--rows 1200 --files 2 --repeats 5]
    .venv/bin/python benchmarks/parquet_reader.py --data outputs/quickstart/poison/shards --repeats 3

Starts a local Ray (what a test module or a phase on a laptop gets), then times, alternating the two paths so
that a slow minute of the machine hits both: `read_shards(...).materialize()` and a read -> map_batches ->
write_parquet, with `ray.parquet_reader` v1 and v2. Without --data it writes Fashion-MNIST shards of --rows
rows first (the size of a test's data). Every phase of the product makes several such reads, so a fixed cost
per read adds up in short phases and in the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchmarks.results_io import write_results  # noqa: E402
from ubt_ray.config import load_config  # noqa: E402
from ubt_ray.shards import read_shards  # noqa: E402

READERS = ("v1", "v2")


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="shard directory to read (default: Fashion-MNIST shards written here)")
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray (the tests use 4)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="parquet_reader_"))
    data = args.data
    if data is None:
        from helpers import fashion_mnist_shards
        data = fashion_mnist_shards(tmp / "shards", rows=args.rows, files=args.files)
    ray.init(num_cpus=args.num_cpus, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfgs = {r: load_config(None, [f"experimental.ray.parquet_reader={r}"]) for r in READERS}
    rows = read_shards(data, cfgs["v1"]).count()
    times: dict[str, dict[str, list[float]]] = {r: {"read": [], "read_map_write": []} for r in READERS}
    for i in range(args.repeats + 1):  # the first round warms the workers up and is not counted
        for r in READERS:
            read = timed(lambda: read_shards(data, cfgs[r]).materialize())
            write = timed(lambda: read_shards(data, cfgs[r]).map_batches(lambda b: b, batch_format="pyarrow")
                          .write_parquet(str(tmp / f"out_{r}_{i}")))
            if i:
                times[r]["read"].append(read)
                times[r]["read_map_write"].append(write)
    result = {"data": data, "rows": rows, "repeats": args.repeats, "num_cpus": args.num_cpus, "seconds": times}
    lines = [f"Ray Data reads of {rows} rows ({data if args.data else f'{args.files} Fashion-MNIST files'}), "
             f"local Ray with {args.num_cpus} logical CPUs, {args.repeats} alternated repeats after a warm-up round; "
             "seconds, median (min-max):", "",
             "| ray.parquet_reader | read -> materialize | read -> map_batches -> write_parquet |", "|---|---|---|"]
    for r in READERS:
        cells = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in times[r].values()]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    write_results(args.out, "parquet_reader", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
