#!/usr/bin/env python
"""Fault injection: `kill -9` a training run at random moments, `--resume` it each time, and check
that it ends exactly where an uninterrupted run ends.

    python eval/kill_resume.py --tokens DIR --out DIR [--engine single|zero3] [--kills 5] [--steps 16]
                               [--ckpt-every 2] [--seed 0] [--json REPORT]

First an uninterrupted reference run; then the same command (always with `--resume`) is started,
`SIGKILL`ed with every process below it (DataLoader workers, torchrun and its ranks: all stopped
first, then killed, as when a machine is preempted) and started again, `--kills` times, then left to finish. Each kill comes at a random moment of one kind:
``checkpoint`` (while the first checkpoint from a random step on is being written: its
`.tmp-step-*` folder exists), ``step`` (a random time after a random step was logged) or ``startup`` (a random time after launch: imports,
model building, loading the checkpoint). It passes when the final weights equal the reference's
(max |diff| <= 1e-6), `metrics.jsonl` lists every step exactly once, and every logged loss equals
the reference's. Exit 1 when it does not pass.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, markdown_table, non_negative_int, positive_int, run, setup_logging, write_json

log = logging.getLogger("kill_resume")
REPO = Path(__file__).resolve().parent.parent
TINY = ["model.dim=64", "model.enc_layers=1", "model.dec_layers=1", "data.batch_size=8", "data.shuffle_buffer=16", "log_every=1", "data.num_workers=1", "keep_checkpoints=2"]
KINDS = ("checkpoint", "step", "startup")


def command(engine: str, tokens: Path, out: Path, steps: int, ckpt_every: int, port: int) -> list[str]:
    """The training command line (the same for the reference and every restart, plus --resume)."""
    overrides = [*TINY, f"ckpt_every={ckpt_every}"]
    args = [str(REPO / "launch" / "train.py"), "--config", "configs/train/tiny_encdec.yaml", "--data", str(tokens), "--out", str(out), "--max-steps", str(steps), "--quiet"]
    if engine == "zero3":
        overrides.append("data.num_workers=0")
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
        args += ["--deepspeed", "configs/deepspeed/zero3.json"]
    else:
        head = [sys.executable]
    return head + args + [a for o in overrides for a in ("--set", o)]


def _env(engine: str) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if engine == "zero3":
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _last_logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def _mtime(path: Path) -> int:
    """Modification time in ns (0 when absent): a step counts once this launch has written the log."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _checkpoint_step(out: Path) -> int:
    from fourm.training.checkpoint import latest_checkpoint, read_state

    latest = latest_checkpoint(out)
    return read_state(latest)["step"] if latest is not None else 0


def _temp_folders(out: Path) -> dict[str, int]:
    """Checkpoint temp folders (name -> mtime in ns)."""
    root = out / "checkpoints"
    found = {}
    for p in root.glob(".tmp-step-*") if root.is_dir() else []:
        try:
            found[p.name] = p.stat().st_mtime_ns
        except OSError:  # renamed meanwhile
            pass
    return found


def _writing_checkpoint(out: Path, stale: dict[str, int] | None = None) -> int:
    """The step of a checkpoint being written (a temp folder not in ``stale``, i.e. not left by an
    earlier kill), else 0."""
    steps = [int(name.rsplit("-", 1)[1]) for name, mtime in _temp_folders(out).items() if (stale or {}).get(name) != mtime]
    return max(steps, default=0)


def start(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc); torchrun puts its ranks in new sessions,
    so a process-group kill would miss them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def kill_tree(pid: int) -> None:
    """Like a machine going away: stop the whole tree (so nothing moves on meanwhile), then SIGKILL it."""
    stopped: set[int] = set()
    for _ in range(3):  # a process may fork while we look
        for p in set(descendants(pid)) - stopped:
            try:
                os.kill(p, signal.SIGSTOP)
                stopped.add(p)
            except ProcessLookupError:
                pass
    for p in stopped:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_run(proc: subprocess.Popen, kind: str, out: Path, steps: int, rng: random.Random, seconds_per_step: float) -> dict:
    """Wait for a random moment of ``kind``, then SIGKILL the process group. Returns what happened."""
    t0 = time.monotonic()
    stale, metrics_at_launch = _temp_folders(out), _mtime(out / "metrics.jsonl")
    target_step = rng.randint(_checkpoint_step(out) + 1, max(_checkpoint_step(out) + 1, steps - 1))
    delay = rng.uniform(0.0, seconds_per_step) if kind == "step" else rng.uniform(1.0, 8.0)
    fired_at = None
    while proc.poll() is None:
        now = time.monotonic() - t0
        if kind == "startup" and now >= delay:
            break
        if kind == "checkpoint" and _writing_checkpoint(out, stale) >= target_step:
            break
        if kind == "step" and _mtime(out / "metrics.jsonl") != metrics_at_launch and _last_logged_step(out) >= target_step:
            fired_at = fired_at if fired_at is not None else now
            if now - fired_at >= delay:
                break
        time.sleep(0.005)
    finished = proc.poll() is not None
    if not finished:
        kill_tree(proc.pid)
    proc.wait()
    return {
        "kind": kind,
        "killed": not finished,
        "after_s": round(time.monotonic() - t0, 2),
        "last_logged_step": _last_logged_step(out),
        "checkpoint_step": _checkpoint_step(out),
        "half_written_checkpoint_left": _writing_checkpoint(out) > 0,
    }


def _load_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _loss_diff(a: float | None, b: float | None) -> float:
    """|a - b|; a step skipped as non-finite logs null, which matches only null."""
    if a is None or b is None:
        return 0.0 if a is b else float("inf")
    return abs(a - b)


def compare(reference: Path, killed: Path, steps: int) -> dict:
    """Final weights, steps logged and losses of the killed run against the reference."""
    a, b = _load_weights(reference), _load_weights(killed)
    max_diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a) if set(a) == set(b) else float("inf")
    ma, mb = _metrics(reference), _metrics(killed)
    logged = [r["step"] for r in mb]
    loss_diff = max((_loss_diff(x["loss"], y["loss"]) for x, y in zip(ma, mb)), default=0.0) if len(ma) == len(mb) else float("inf")
    ta, tb = (json.loads((d / "summary.json").read_text())["tokens"] for d in (reference, killed))
    return {
        "max_weight_diff": max_diff,
        "steps_logged_once": logged == list(range(1, steps + 1)),
        "steps_logged": len(logged),
        "max_loss_diff": loss_diff,
        "tokens_equal": ta == tb,
    }


def main(argv=None) -> int:
    p = ArgumentParser(prog="kill_resume.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", required=True, help="token shards (pretokenize.py --out)")
    p.add_argument("--out", required=True, help="work directory (reference/, killed/, logs)")
    p.add_argument("--engine", choices=("single", "zero3"), default="single", help="one process, or DeepSpeed ZeRO-3 with 2 ranks (torchrun, gloo)")
    p.add_argument("--kills", type=non_negative_int, default=5)
    p.add_argument("--steps", type=positive_int, default=16)
    p.add_argument("--ckpt-every", type=positive_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    setup_logging()
    tokens, out = Path(args.tokens), Path(args.out)
    if not (tokens / "manifest.json").is_file():
        raise UsageError(f"--tokens {tokens}: no manifest.json (run data_pipelines/pretokenize.py)")
    if args.steps < 3:
        raise UsageError("--steps must be at least 3")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("reference", "killed"):
        if (out / name).exists():
            raise UsageError(f"{out / name} exists: choose a new --out")
    rng = random.Random(args.seed)
    env = _env(args.engine)
    port = 29600 + os.getpid() % 300

    t0 = time.monotonic()
    ref = subprocess.run(command(args.engine, tokens, out / "reference", args.steps, args.ckpt_every, port), cwd=REPO, env=env, capture_output=True, text=True)
    if ref.returncode != 0:
        raise RuntimeError(f"the reference run failed: {ref.stderr.strip().splitlines()[-1:]}")
    reference_s = time.monotonic() - t0
    seconds_per_step = json.loads((out / "reference" / "summary.json").read_text())["seconds_per_step"]
    log.info("reference run: %.1f s (%.2f s/step)", reference_s, seconds_per_step)

    kinds = list(KINDS[: args.kills]) + [rng.choice(KINDS) for _ in range(args.kills - len(KINDS))]
    rng.shuffle(kinds)
    kills, resumed_from = [], []
    log_path = out / "killed.log"
    for i, kind in enumerate(kinds):
        proc = start(command(args.engine, tokens, out / "killed", args.steps, args.ckpt_every, port + 1 + i) + ["--resume"], env, log_path)
        kills.append(kill_run(proc, kind, out / "killed", args.steps, rng, seconds_per_step))
        log.info("kill %d (%s): %s", i + 1, kind, kills[-1])
    final = subprocess.run(command(args.engine, tokens, out / "killed", args.steps, args.ckpt_every, port + 1 + len(kinds)) + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True)
    with open(log_path, "a") as f:
        f.write(final.stderr)
    if final.returncode != 0:
        raise RuntimeError(f"the last resume failed: {final.stderr.strip().splitlines()[-1:]}")
    resumed_from = [int(m) for m in re.findall(r"resuming from \S+ \(step (\d+)\)", log_path.read_text())]
    result = compare(out / "reference", out / "killed", args.steps)
    passed = result["max_weight_diff"] <= 1e-6 and result["steps_logged_once"] and result["max_loss_diff"] == 0.0 and result["tokens_equal"]
    report = {"engine": args.engine, "steps": args.steps, "ckpt_every": args.ckpt_every, "seed": args.seed, "kills": kills, "resumed_from_steps": resumed_from, **result, "passed": passed, "seconds": round(time.monotonic() - t0, 1)}
    write_json(args.json, report)
    rows = [[i + 1, k["kind"], k["after_s"], k["last_logged_step"], k["checkpoint_step"], "yes" if k["half_written_checkpoint_left"] else "no", "yes" if k["killed"] else "finished first"] for i, k in enumerate(kills)]
    print(markdown_table(["kill", "moment", "after s", "last step logged", "resumable checkpoint", "half-written checkpoint left", "killed"], rows))
    print(f"\n{args.engine}: {sum(k['killed'] for k in kills)} kills, resumed from steps {resumed_from}; max |weight diff| {result['max_weight_diff']:.3g}, "
          f"every step logged once: {result['steps_logged_once']}, max |loss diff| {result['max_loss_diff']:.3g}: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    run(main)
