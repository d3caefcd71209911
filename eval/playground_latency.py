#!/usr/bin/env python
"""Latency of a running playground (``launch/playground.py``), measured through its HTTP API.

    python eval/playground_latency.py [--url http://127.0.0.1:7860/] [--repeats 6] [--steps 8] [--json OUT]

Two requests, each sent ``--repeats`` times one after another (the first is left out of the
medians): rgb -> depth, semseg, boxes, caption on held-out scenes, and the chain caption -> semseg
-> depth -> rgb. Reports the generation time the server measured and the time from submitting to
having the result (queue, checks, generation, pictures, polling).
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
import uuid

from fourm.cli import ArgumentParser, UsageError, markdown_table, positive_int, run, write_json

REQUESTS = {
    "rgb -> depth, semseg, boxes, caption (held-out scene)": {"image_source": "scene", "targets": "depth,semseg,boxes,caption"},
    "caption -> semseg -> depth -> rgb (chained)": {"image_source": "none", "use_caption": "1", "caption": "a large red sphere left of a small blue cube on the ground", "targets": "semseg,depth,rgb"},
}


def _call(url: str, body: bytes | None = None, headers: dict | None = None) -> dict:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers or {}), timeout=300) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exn:
        raise UsageError(f"{url}: HTTP {exn.code}: {json.loads(exn.read() or b'{}').get('error', '')}") from None
    except (urllib.error.URLError, OSError) as exn:
        raise UsageError(f"no playground answers at {url} ({getattr(exn, 'reason', exn)}): start launch/playground.py first") from None


def submit_and_wait(base: str, fields: dict) -> dict:
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()) + f"--{boundary}--\r\n".encode()
    job = _call(base + "api/jobs", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    while True:
        status = _call(f"{base}api/jobs/{job['id']}")
        if status["state"] == "done":
            return status
        if status["state"] == "error":
            raise UsageError(f"the request failed: {status['error']}")
        time.sleep(0.05)


def main(argv=None) -> int:
    p = ArgumentParser(prog="playground_latency.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:7860/")
    p.add_argument("--repeats", type=positive_int, default=6)
    p.add_argument("--steps", type=positive_int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    base = args.url if args.url.endswith("/") else args.url + "/"
    info = _call(base + "api/info")
    rows, result = [], {"model": info["model"], "arch": info["arch"], "steps": args.steps, "requests": {}}
    for name, fields in REQUESTS.items():
        gen, wall = [], []
        for k in range(args.repeats):
            start = time.perf_counter()
            status = submit_and_wait(base, {**fields, "scene": str(k % info["scenes"]), "seed": str(k), "steps": str(args.steps)})
            wall.append(time.perf_counter() - start)
            gen.append(status["result"]["seconds"])
        kept = slice(1, None) if args.repeats > 1 else slice(None)
        rec = {"generation_s": statistics.median(gen[kept]), "submit_to_result_s": statistics.median(wall[kept]), "repeats": args.repeats}
        result["requests"][name] = rec
        rows.append([name, f"{rec['generation_s']:.2f}", f"{rec['submit_to_result_s']:.2f}"])
    print(markdown_table(["request", "generation (s, median)", "submit to result (s, median)"], rows))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    run(main)
