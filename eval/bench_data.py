#!/usr/bin/env python
"""Data-path speed: rendering the embedded dataset and reading shards back.

    python eval/bench_data.py [--num 2000] [--json OUT]

Prints a Markdown table (docs/benchmarks.md's) and optionally writes the figures as JSON.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time

from fourm.cli import ArgumentParser, markdown_table, positive_int, run, setup_logging, write_json
from fourm.data.loader import LoaderConfig, build_loader
from fourm.data.synth.generate import generate_dataset

log = logging.getLogger("bench_data")


def _read_speed(path: str, workers: int, modalities: tuple[str, ...]) -> float:
    loader, _ = build_loader(path, LoaderConfig(modalities=modalities, batch_size=64, shuffle=1000, num_workers=workers))
    start = time.perf_counter()
    n = sum(len(b["__key__"]) for b in loader)
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = ArgumentParser(prog="bench_data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=positive_int, default=2000, help="scenes rendered at 64 px (a quarter at 128, a sixteenth at 256)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    setup_logging()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res, num in ((64, args.num), (128, max(1, args.num // 4)), (256, max(1, args.num // 16))):
            for workers in (1, os.cpu_count() or 1):
                m = generate_dataset(os.path.join(tmp, f"{res}-{workers}"), num, res=res, seed=0, shard_size=500, workers=workers, progress=False)
                rows.append({"what": f"render {res}x{res}", "workers": workers, "per_second": round(m["scenes_per_second"], 1), "unit": "scenes/s"})
        path64 = os.path.join(tmp, f"64-{os.cpu_count() or 1}")
        for workers in (0, 2):
            for mods in (("rgb", "depth", "semseg", "boxes", "caption"),):
                rows.append({"what": "read + decode 64x64 (5 modalities)", "workers": workers, "per_second": round(_read_speed(path64, workers, mods), 1), "unit": "samples/s"})
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}", "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(markdown_table(["what", "workers", "speed"], [[r["what"], r["workers"], f"{r['per_second']} {r['unit']}"] for r in rows]))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    run(main)
