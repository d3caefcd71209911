"""Levers measured side by side: arms (training recipes that differ by a few config settings) trained
on the same token shards for the same wall-clock minutes, each evaluated on the same held-out scenes
at a few points during training (a curve, not an end point), once per seed.

An arm is ``NAME`` (the base recipe) or ``NAME:key=value,key=value`` (``--set`` style overrides of
the training config). Every run leaves ``OUT/ARM/seed-S/`` (its training run, snapshots and
``curve.json``); a run whose ``curve.json`` was made with the same settings is reused, so arms can be
added to a comparison later. A lever counts when its gain beats the spread between seeds.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fourm.eval.suite import DIRECTIONS, GENEVAL, SECONDARY, TARGETS

log = logging.getLogger(__name__)
HEADLINE = {d: TARGETS[d][0] for d in DIRECTIONS}  # the figure a curve follows, per direction


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...] = ()


def needs_judge(directions: tuple[str, ...] | list[str]) -> bool:
    """Whether the judge's segmenter scores any of these directions (caption -> rgb, all-or-nothing
    or GenEval-style)."""
    return bool({"caption_to_rgb", GENEVAL} & set(directions))


def parse_arm(text: str) -> Arm:
    """``NAME`` or ``NAME:key=value,key=value`` -> Arm; ValueError for a malformed one."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"arm {text!r}: give NAME or NAME:key=value,key=value (a name without '/')")
    overrides = tuple(s.strip() for s in rest.split(",") if s.strip())
    bad = [s for s in overrides if "=" not in s]
    if bad:
        raise ValueError(f"arm {name!r}: {bad[0]!r} is not key=value")
    return Arm(name, overrides)


@dataclass
class SideBySideConfig:
    """What every arm shares: the base training config, minutes, curve points, seeds, evaluation."""

    train_config: str
    tokens: str  # token shards (training)
    val: str  # raw held-out shards
    train_raw: str  # raw training shards (the evaluation's floors)
    tokenizers: str
    minutes: float = 6.0
    points: int = 3  # evaluations per run, evenly spaced in minutes (the last one is the final model)
    seeds: tuple[int, ...] = (0,)
    scenes: int = 64
    directions: tuple[str, ...] = DIRECTIONS
    base_overrides: tuple[str, ...] = field(default_factory=tuple)  # applied to every arm, before its own

    def __post_init__(self) -> None:
        if not self.minutes > 0 or self.points < 1 or not self.seeds or self.scenes < 1:
            raise ValueError("minutes must be > 0, points >= 1, scenes >= 1 and at least one seed")


def _run_spec(cfg: SideBySideConfig, arm: Arm, seed: int) -> dict:
    """What a run's figures depend on: a saved curve is reused only when this matches."""
    return {"arm": arm.name, "overrides": list(cfg.base_overrides + arm.overrides), "seed": seed, "minutes": cfg.minutes, "points": cfg.points,
            "train_config": str(cfg.train_config), "tokens": str(cfg.tokens), "val": str(cfg.val), "scenes": cfg.scenes, "directions": list(cfg.directions)}


def train_arm(cfg: SideBySideConfig, arm: Arm, seed: int, run: Path, progress: bool = True) -> dict:
    """Train one arm for ``cfg.minutes`` into ``run`` with snapshots at the curve's points; returns
    the training summary."""
    from fourm.config import load_config
    from fourm.training.data import DataSource
    from fourm.training.loop import TrainConfig, train

    sets = ["max_steps=100000000", f"max_minutes={cfg.minutes}", f"seed={seed}", f"data.seed={seed}", *cfg.base_overrides, *arm.overrides]
    if cfg.points > 1:
        sets.append(f"snapshot_every_minutes={cfg.minutes / cfg.points}")
    tcfg = load_config(TrainConfig, cfg.train_config, sets)
    tcfg.data.sources = [DataSource(path=str(cfg.tokens))]
    return train(tcfg, run, resume=False, progress=progress)


def evaluate_run(cfg: SideBySideConfig, run: Path, judge=None, progress: bool = True) -> list[dict]:
    """Every snapshot of ``run`` and its final model on the held-out scenes: the curve, a point per
    evaluation ({minutes, step, tokens, figures: {direction: {metric: value}}}), in minutes' order."""
    from fourm.eval.suite import EvalConfig, evaluate
    from fourm.generation.files import open_model

    summary = json.loads((run / "summary.json").read_text())
    points = [(json.loads((d / "snapshot.json").read_text()), d) for d in sorted((run / "snapshots").glob("min-*")) if (d / "snapshot.json").is_file()]
    points.append(({"step": summary["steps"], "tokens": summary["tokens"], "minutes": cfg.minutes}, run / "final"))
    curve = []
    for record, directory in points:
        model, tok = open_model(directory, cfg.tokenizers)
        report, _ = evaluate(model, tok, cfg.val, EvalConfig(scenes=cfg.scenes, directions=cfg.directions), train_dir=cfg.train_raw, judge=judge, progress=progress)
        curve.append({**record, "figures": report["model"], "floor": report["floor"]})
    return curve


def run_side_by_side(cfg: SideBySideConfig, arms: list[Arm], out: Path, judge=None, progress: bool = True) -> dict:
    """Train and evaluate every (arm, seed), arms taking turns within each seed; ``out/side_by_side.json``
    is rewritten after every run (a run already done with the same settings is read back)."""
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "minutes": cfg.minutes, "points": cfg.points, "seeds": list(cfg.seeds), "scenes": cfg.scenes, "train_config": str(cfg.train_config), "arms": {}}
    for seed in cfg.seeds:
        for arm in arms:
            run = out / arm.name / f"seed-{seed}"
            spec = _run_spec(cfg, arm, seed)
            saved = run / "curve.json"
            record = json.loads(saved.read_text()) if saved.is_file() else None
            if record is None or record.get("spec") != spec:
                log.info("arm %s, seed %d: training %.1f minutes (%s)", arm.name, seed, cfg.minutes, ", ".join(arm.overrides) or "the base recipe")
                start = time.perf_counter()
                summary = train_arm(cfg, arm, seed, run, progress)
                train_seconds = time.perf_counter() - start
                curve = evaluate_run(cfg, run, judge, progress)
                record = {"spec": spec, "steps": summary["steps"], "tokens": summary["tokens"], "train_seconds": round(train_seconds, 1),
                          "tokens_per_s": round(summary["tokens"] / max(cfg.minutes * 60, 1e-9), 1), "curve": curve}
                saved.write_text(json.dumps(record, indent=1) + "\n")
            else:
                log.info("arm %s, seed %d: reusing %s", arm.name, seed, saved)
            entry = result["arms"].setdefault(arm.name, {"overrides": list(arm.overrides), "runs": []})
            entry["runs"].append({"seed": seed, **{k: record[k] for k in ("steps", "tokens", "train_seconds", "tokens_per_s", "curve")}})
            (out / "side_by_side.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def machine() -> str:
    """The CPU this ran on, in words (figures are only comparable on one machine)."""
    import os

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def _final(run: dict, direction: str, metric: str) -> float | None:
    return run["curve"][-1]["figures"].get(direction, {}).get(metric)


def summary_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the final figures per arm: the mean over seeds, ± half the seeds' range."""
    directions = [d for d in DIRECTIONS if any(d in r["curve"][-1]["figures"] for a in result["arms"].values() for r in a["runs"])]
    metrics = [(d, m) for d in directions for m in (HEADLINE[d], SECONDARY[d])]
    header = ["arm", "settings", "seeds", "steps", *[f"{d.replace('rgb_to_', '').replace('caption_to_rgb', 'caption→rgb')} {m}" for d, m in metrics]]
    rows = []
    for name, arm in result["arms"].items():
        runs = arm["runs"]
        cells = [name, ", ".join(arm["overrides"]) or "(base)", str(len(runs)), f"{statistics.mean(r['steps'] for r in runs):.0f}"]
        for d, m in metrics:
            values = [v for v in (_final(r, d, m) for r in runs) if v is not None]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}")
        rows.append(cells)
    return header, rows


def plot_curves(result: dict, path: str | Path, panel: tuple[int, int] = (260, 200)) -> None:
    """A PNG: one panel per direction (its headline figure against training minutes), one colour per
    arm, one line per seed, labelled axes and a legend (``fourm.viz.line_chart``)."""
    from fourm.viz import line_chart

    directions = [d for d in DIRECTIONS if any(d in r["curve"][-1]["figures"] for a in result["arms"].values() for r in a["runs"])]
    panels = [{"title": f"{d.replace('_', ' ')}: {HEADLINE[d]}", "x_max": result["minutes"], "x_unit": "min",
               "series": [(j, [(p["minutes"], p["figures"].get(d, {}).get(HEADLINE[d])) for p in r["curve"]]) for j, arm in enumerate(result["arms"].values()) for r in arm["runs"]]}
              for d in directions]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(line_chart(panels, list(result["arms"]), panel)).save(path)
