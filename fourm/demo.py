"""The main job, ``make demo``: stages run in order, each reused when its output is complete.

Stages: render the embedded dataset (train and held-out splits); read the held-out split back and
report its statistics; train the text, rgb, depth and semseg tokenizers; pretokenize both splits;
train the any-to-any model (encoder-decoder by default, ``--set model=decoder`` for decoder-only)
on the mixed objectives; evaluate every direction on held-out scenes against floors and ceilings
(``fourm.eval.suite``); draw samples (rgb -> depth, semseg, boxes, caption; caption -> rgb).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fourm.config import to_dict
from fourm.data.loader import LoaderConfig, build_loader
from fourm.data.object_labels import OBJECT_LABELS
from fourm.data.shards import MANIFEST
from fourm.data.synth.generate import GENERATOR_VERSION, generate_dataset
from fourm.data.synth.scene import BOX_LABELS, CLASSES
from fourm.viz import caption_strip, colorize_depth, draw_boxes, grid, line_chart, overlay, semseg_legend, upscale

log = logging.getLogger(__name__)


@dataclass
class DemoDataConfig:
    train_scenes: int = 10000  # the 30-minute model sees ~8,500 samples: more scenes only cost pretokenizing time
    val_scenes: int = 500
    res: int = 64
    train_seed: int = 0
    val_seed: int = 1
    shard_size: int = 1000

    def __post_init__(self) -> None:
        for name in ("train_scenes", "val_scenes", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if not 16 <= self.res <= 1024:
            raise ValueError(f"data.res must be between 16 and 1024, got {self.res}")


@dataclass
class DemoTokenizerConfig:
    # minutes of each image tokenizer: depth and semseg are simple signals whose round trips plateau
    # early (held-out delta1 0.989 and mIoU 0.95 after 500 steps), rgb's keeps improving
    minutes: dict[str, float] = field(default_factory=lambda: {"rgb": 3.0, "depth": 1.5, "semseg": 2.0})
    max_steps: int = 3000
    # the image tokenizers' batch (their configs' 32 suit 10 minutes): in the demo's minutes a
    # step is what they lack. 2-core AMD EPYC (AVX2, fp32), depth's 1.5 minutes: 419 steps of 8
    # gave held-out delta1 0.978 and AbsRel 0.035 against 122 steps of 32 at 0.940 and 0.069
    # (docs/tokenizers.md)
    batch_size: int = 8
    overrides: list[str] = field(default_factory=list)  # --set style, applied to every image tokenizer
    # coordinate bins of the boxes; 0: data.res, one bin a pixel (the library's default is 1000; at
    # the demo's budget, same shards: mAP@0.5 0.015 with 64 bins against 0.003 with 1000, docs/tokenizers.md)
    box_bins: int = 0

    def __post_init__(self) -> None:
        bad = [f"{n}={self.minutes.get(n)}" for n in IMAGE_TOKENIZERS if not (self.minutes.get(n) or 0) > 0]
        if bad or set(self.minutes) - set(IMAGE_TOKENIZERS):
            raise ValueError(f"tokenizers.minutes needs minutes > 0 for each of {', '.join(IMAGE_TOKENIZERS)} and no other (got {dict(self.minutes)})")
        if self.batch_size < 1:
            raise ValueError(f"tokenizers.batch_size must be >= 1, got {self.batch_size}")


IMAGE_TOKENIZERS = ("rgb", "depth", "semseg")


# The encoder-decoder's dense auxiliary loss on the scenes' object label maps (the 5 semseg classes
# with each object's pixels given its box label's class, 53 in all), weight 4: in 6-minute
# side-by-side runs, two seeds each, caption F1 0.272 / 0.240 (precision above its floor) against
# 0.081 / 0.184 with semseg maps, mIoU 0.441 / 0.433 against 0.455 / 0.456
# (docs/training-recipe.md#arms-measured). Residual output projections start at zero: caption F1
# 0.303 / 0.276 against 0.235 / 0.234 at 6 minutes, mIoU 0.481 / 0.468 against 0.460 / 0.471.
# Given before ``train.overrides``, which can change it.
ENCDEC_DEMO_RECIPE = ("model.aux_labels=objects", f"model.aux_classes={len(CLASSES) + len(BOX_LABELS)}", "model.aux_weight=4", "model.zero_init_out=true")


@dataclass
class DemoTrainConfig:
    # 0: whatever the budget leaves once the stages before it have run (the judge among them; its
    # minutes are kept too when that stage is skipped) and eval.reserve_minutes (``model_minutes``):
    # the same wall time on a slow machine as on a fast one, and every minute the other stages save
    # goes to the model; > 0: these minutes
    minutes: float = 0.0
    min_minutes: float = 1.0  # the least the model gets when the stages before it overran
    max_steps: int = 5000
    overrides: list[str] = field(default_factory=list)


@dataclass
class DemoEvalConfig:
    scenes: int = 64  # held-out scenes in the evaluation suite
    steps: int = 8  # MaskGIT steps of caption -> rgb
    predict_steps: int = 1  # of rgb -> depth / semseg (greedy; EvalConfig.predict_steps)
    judge_minutes: float = 3.5  # the caption -> rgb judge's segmenter (trained once, then reused)
    judge_steps: int = 2000
    # kept for the evaluation suite and the samples after the model: 2.6 minutes on a 2-core AMD EPYC
    # with AVX2 only, the slowest machine measured (2.5 left its demo 10 s over 30 minutes)
    reserve_minutes: float = 3.0
    # ... or less, timed on the model's own steps (``TrainConfig.deadline``): the evaluation and the
    # samples took 200-255 training steps' time on the three machines measured (2-core AMD EPYCs
    # with AVX2 only and with AVX512-BF16), so the model trains on until these seconds plus this
    # many of its steps' time are left, where that leaves it more than reserve_minutes would
    reserve_seconds: float = 45.0
    reserve_steps: float = 250.0


@dataclass
class DemoConfig:
    data: DemoDataConfig = field(default_factory=DemoDataConfig)
    overview_scenes: int = 8
    model: str = "encdec"  # encdec | decoder
    tokenizers: DemoTokenizerConfig = field(default_factory=DemoTokenizerConfig)
    train: DemoTrainConfig = field(default_factory=DemoTrainConfig)
    eval: DemoEvalConfig = field(default_factory=DemoEvalConfig)
    sample_scenes: int = 8
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    budget_minutes: float = 30.0  # the whole run's wall time, install included where make passes its start

    def __post_init__(self) -> None:
        if self.overview_scenes < 0:
            raise ValueError(f"overview_scenes must be >= 0, got {self.overview_scenes}")
        if self.model not in ("encdec", "decoder"):
            raise ValueError(f"model must be 'encdec' or 'decoder', got {self.model!r}")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")


# the judge trains before the model: it needs only the data and the rgb tokenizer, and a judge
# that ends before its minutes (its step cap, on a fast machine) leaves them to the model
STAGES = ("data", "inspect", "tokenizers", "pretokenize", "judge", "train", "evaluate", "samples")


def scale_to_budget(config: DemoConfig, minutes: float) -> DemoConfig:
    """Scale the timed stages (tokenizers, model, judge) to a budget other than the 30 minutes the
    defaults are sized for. Below 30 minutes fewer scenes are rendered; above it, more (the model
    sees more samples) and the step caps rise with the time, so a longer budget is used."""
    factor = max(minutes, 0.5) / 30.0
    config.budget_minutes = minutes
    config.tokenizers.minutes = {name: m * factor for name, m in config.tokenizers.minutes.items()}
    config.train.minutes *= factor
    config.eval.judge_minutes *= factor
    if factor < 1.0:
        config.data.train_scenes = max(min(100, config.data.train_scenes), int(config.data.train_scenes * factor))
        config.data.val_scenes = max(min(16, config.data.val_scenes), int(config.data.val_scenes * min(1.0, factor * 2)))
    elif factor > 1.0:
        config.data.train_scenes = int(config.data.train_scenes * factor)
        config.tokenizers.max_steps = int(config.tokenizers.max_steps * factor)
        config.train.max_steps = int(config.train.max_steps * factor)
        config.eval.judge_steps = int(config.eval.judge_steps * factor)
    return config


def model_minutes(config: DemoConfig, elapsed_seconds: float, judge_trained: bool) -> float:
    """The model's training minutes: ``train.minutes`` when set, else what the budget leaves after
    ``elapsed_seconds`` (since the budget began), the judge's minutes (unless it is trained
    already) and ``eval.reserve_minutes``; never below ``train.min_minutes``."""
    if config.train.minutes > 0:
        return config.train.minutes
    left = config.budget_minutes - elapsed_seconds / 60 - (0.0 if judge_trained else config.eval.judge_minutes) - config.eval.reserve_minutes
    return round(max(config.train.min_minutes, left), 2)


def _dataset_complete(directory: Path, num: int, res: int, seed: int) -> bool:
    path = directory / MANIFEST
    if not path.is_file():
        return False
    try:
        m = json.loads(path.read_text())
    except ValueError:
        return False
    return (m.get("num_samples"), m.get("resolution"), m.get("seed"), m.get("generator")) == (num, res, seed, GENERATOR_VERSION)


def stage_data(config: DemoConfig, out: Path) -> dict:
    """Render data/train and data/val unless already there with the same size, resolution and seed."""
    report = {}
    for split, num, seed in (("train", config.data.train_scenes, config.data.train_seed), ("val", config.data.val_scenes, config.data.val_seed)):
        directory = out / "data" / split
        if _dataset_complete(directory, num, config.data.res, seed):
            log.info("data/%s: reusing %d scenes", split, num)
            report[split] = {"num_samples": num, "reused": True}
            continue
        manifest = generate_dataset(directory, num, res=config.data.res, seed=seed, shard_size=config.data.shard_size, overwrite=True)
        report[split] = {"num_samples": num, "reused": False, "scenes_per_second": round(manifest["scenes_per_second"], 1)}
    return report


def stage_inspect(config: DemoConfig, out: Path) -> dict:
    """Read the held-out split through the loader; statistics and an overview grid."""
    loader, skipped = build_loader(out / "data" / "val", LoaderConfig(modalities=("rgb", "depth", "semseg", "boxes", "caption"), batch_size=32, shuffle=0, num_workers=0))
    manifest = json.loads((out / "data" / "val" / MANIFEST).read_text())
    classes = manifest["classes"]
    n, objects, words = 0, Counter(), []
    pixel_counts = np.zeros(len(classes), np.int64)
    depth_min, depth_max = np.inf, 0.0
    panels = []
    start = time.perf_counter()
    for batch in loader:
        for i in range(len(batch["caption"])):
            n += 1
            objects[len(batch["boxes"][i])] += 1
            words.append(len(batch["caption"][i].split()))
            if len(panels) < config.overview_scenes:
                rgb = batch["rgb"][i].permute(1, 2, 0).numpy()
                sem = batch["semseg"][i].numpy()
                dep = batch["depth"][i, 0].numpy()
                s = max(1, 128 // rgb.shape[0])
                row = [upscale(rgb, s), upscale(colorize_depth(dep), s), upscale(overlay(rgb, sem), s), draw_boxes(rgb, batch["boxes"][i], s)]
                row.append(caption_strip(batch["caption"][i], 2 * row[0].shape[1]))
                panels.append(row)
        pixel_counts += np.bincount(batch["semseg"].flatten().numpy(), minlength=len(classes))[: len(classes)]
        depth_min = min(depth_min, float(batch["depth"].min()))
        depth_max = max(depth_max, float(batch["depth"].max()))
    read_s = time.perf_counter() - start
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    if panels:
        Image.fromarray(grid(panels)).save(samples / "data_overview.png")
    return {
        "val_samples_read": n,
        "skipped": skipped.as_dict(),
        "boxes_per_scene": dict(sorted(objects.items())),
        "caption_words_mean": round(float(np.mean(words)), 2),
        "class_pixel_fraction": {c: round(float(v) / max(1, int(pixel_counts.sum())), 4) for c, v in zip(classes, pixel_counts)},
        "depth_range_m": [round(depth_min, 3), round(depth_max, 3)],
        "read_samples_per_second": round(n / read_s, 1) if read_s > 0 else None,
        "overview": str(samples / "data_overview.png"),
    }


def write_report(out: Path, config: DemoConfig, stages: dict, seconds: float, budget_seconds: float | None = None) -> None:
    """``report.json`` (everything) and ``report.md`` (a readable summary); ``budget_seconds``:
    the time since the budget began (``run_demo``'s ``started``), install included."""
    report = {"config": to_dict(config), "stages": stages, "seconds": round(seconds, 1), "budget_seconds": None if budget_seconds is None else round(budget_seconds, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    ins = stages.get("inspect", {"val_samples_read": 0, "skipped": {"total": 0}, "read_samples_per_second": None, "boxes_per_scene": {}, "caption_words_mean": None, "depth_range_m": [None, None], "class_pixel_fraction": {}})
    lines = [
        "# fourm demo report",
        "",
        f"Total time: {seconds:.0f} s" + (f" ({budget_seconds:.0f} s since the {config.budget_minutes:g}-minute budget began)" if budget_seconds is not None else "") + f". Config: `{out / 'config.json'}`.",
        "",
        "## Data",
        "",
        "| split | scenes | reused | scenes/s |",
        "| --- | ---: | :---: | ---: |",
    ]
    for split, rec in stages["data"].items():
        lines.append(f"| {split} | {rec['num_samples']} | {'yes' if rec['reused'] else 'no'} | {rec.get('scenes_per_second', '-')} |")
    lines += [
        "",
        "## Held-out split read back through the shard loader",
        "",
        f"- samples read: {ins['val_samples_read']} (skipped: {ins['skipped']['total']}), {ins['read_samples_per_second']} samples/s",
        f"- boxes per scene: {ins['boxes_per_scene']}",
        f"- caption length: {ins['caption_words_mean']} words on average",
        f"- depth range: {ins['depth_range_m'][0]} to {ins['depth_range_m'][1]} m",
        f"- pixel share per class: {ins['class_pixel_fraction']}",
        "",
        "![overview](samples/data_overview.png)",
        "",
    ]
    if "tokenizers" in stages:
        lines += ["## Tokenizers (held-out validation at the end of training)", "", "| tokenizer | steps | validation | seconds |", "| --- | ---: | --- | ---: |"]
        for name, rec in stages["tokenizers"].items():
            lines.append(f"| {name} | {rec.get('steps', '-')} | {rec.get('val', 'reused' if rec.get('reused') else '-')} | {rec.get('seconds', '-')} |")
        lines.append("")
    if stages.get("judge") and not stages["judge"].get("reused"):
        lines += ["## Judge", "", f"- the caption -> rgb judge's segmenter trained in {stages['judge']['seconds']} s", ""]
    if "train" in stages:
        rec = stages["train"]
        lines += ["## Model training", "", f"- {'reused' if rec.get('reused') else str(rec.get('steps')) + ' steps in ' + str(rec.get('minutes')) + ' minutes, ' + str(rec.get('tokens')) + ' tokens, ' + str(rec.get('seconds')) + ' s'}; last: {rec.get('last', {})}", ""]
    if plot_losses(out, out / "samples" / "losses.png"):
        lines += ["Training losses (tokenizers: their reconstruction loss; the model: its loss and each modality's):", "", "![losses](samples/losses.png)", ""]
    if stages.get("evaluate"):
        from fourm.eval.suite import markdown_report

        rec = stages["evaluate"]
        lines += [f"## Evaluation on {rec['scenes']} held-out scenes", "", "Floor: trivial baselines; ceiling: the tokenizers alone (for caption → rgb, the judge on the rgb tokenizer's round trip of the true images).", "", markdown_report(rec), ""]
        if rec.get("judge"):
            own = rec["ceiling"].get("caption_to_rgb_true_images", {}).get("accuracy")
            lines += [f"Judge segmenter: {rec['judge']}" + (f" (its accuracy on the true images: {own:.3f})" if own is not None else ""), ""]
    if stages.get("samples"):
        rec = stages["samples"]
        lines += ["## Samples on held-out scenes", ""]
        lines += [f"- caption: `{c['pred']}` (true: `{c['true']}`)" for c in rec["captions"]]
        lines += ["", "![rgb to all](samples/rgb_to_all.png)", "", "![caption to rgb](samples/caption_to_rgb.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def _smooth(points: list[tuple[float, float | None]], windows: int) -> list[tuple[float, float]]:
    """About ``windows`` (x, mean y) points of a curve: each window of consecutive points at its
    last x, its y the mean of the ones present (NaN when none is)."""
    width = max(1, len(points) // windows)
    out = []
    for i in range(0, len(points), width):
        chunk = points[i : i + width]
        ys = [y for _, y in chunk if y is not None]
        out.append((chunk[-1][0], float(np.mean(ys)) if ys else float("nan")))
    return out


def plot_losses(out: Path, path: Path) -> bool:
    """The tokenizers' and the model's training losses against steps as one picture at ``path``
    (a panel each; log scale); False when no run has left its history yet."""
    panels, legend = [], ["loss", *MODEL_LOSSES]
    for name in IMAGE_TOKENIZERS:
        history = out / "tokenizers" / name / "train_history.json"
        if history.is_file():
            losses = json.loads(history.read_text()).get("loss", [])
            if losses:
                panels.append({"title": f"{name} tokenizer", "x_max": len(losses), "x_unit": "steps", "log_y": True, "series": [(0, _smooth(list(enumerate(losses, 1)), 200))]})
    metrics = out / "train" / "metrics.jsonl"
    if metrics.is_file():
        rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r and "step" in r]
        if rows:
            curve = lambda key: _smooth([(r["step"], r.get(key)) for r in rows], 60)  # noqa: E731 (logged every few steps)
            series = [(0, curve("loss"))] + [(j + 1, curve(f"loss/{m}")) for j, m in enumerate(MODEL_LOSSES) if any(f"loss/{m}" in r for r in rows)]
            panels.append({"title": "model", "x_max": rows[-1]["step"], "x_unit": "steps", "log_y": True, "series": series})
    if not panels:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(line_chart(panels, legend)).save(path)
    return True


MODEL_LOSSES = ("rgb", "depth", "semseg", "boxes", "caption")


def _check_model_kind(config: DemoConfig, out: Path) -> None:
    """UsageError when ``out`` already holds a model (or a training run) of the other architecture:
    reusing it would report the wrong model, retraining would overwrite it."""
    from fourm.cli import UsageError

    for path in (out / "model" / "config.json", out / "train" / "final" / "config.json"):
        try:
            arch = json.loads(path.read_text()).get("arch")
        except (OSError, ValueError):
            continue
        if arch and arch != config.model:
            raise UsageError(f"{out} holds a model of arch {arch!r}, not {config.model!r}: use another output directory (copy data/, tokenizers/, tokens/ and judge/ there to reuse them) or remove {out / 'model'} and {out / 'train'}")
    other = "decoder" if config.model == "encdec" else "encdec"
    try:  # an unfinished run: its preset is the demo's <arch>_tiny.yaml
        preset = Path(json.loads((out / "train" / "config.json").read_text()).get("model_preset") or "").name
    except (OSError, ValueError):
        preset = ""
    if preset.startswith(f"{other}_"):
        raise UsageError(f"{out / 'train'} is an unfinished {other} training run, not {config.model}: use another output directory or remove it")


def run_demo(config: DemoConfig, out: Path, started: float | None = None) -> dict:
    """Run every stage into ``out``; returns the report dict. ``started``: when the budget began
    (``time.time()``; default now): ``make demo`` passes its own start, so install counts."""
    _check_model_kind(config, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    start = time.perf_counter()
    began = time.time() if started is None else started

    def train_stage(config: DemoConfig, out: Path) -> dict:
        deadline = began + 60 * config.budget_minutes if config.train.minutes <= 0 else 0.0
        return stage_train(config, out, model_minutes(config, time.time() - began, _judge_path(out).is_file()), deadline)

    runners = {"data": stage_data, "inspect": stage_inspect, "tokenizers": stage_tokenizers, "pretokenize": stage_pretokenize, "judge": stage_judge, "train": train_stage, "evaluate": stage_evaluate, "samples": stage_samples}
    stages = {}
    for name in STAGES:
        if name in config.stages:
            log.info("stage %s", name)
            stages[name] = runners[name](config, out)
    write_report(out, config, stages, time.perf_counter() - start, time.time() - began)
    return json.loads((out / "report.json").read_text())


# -- the learning stages ---------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


def stage_tokenizers(config: DemoConfig, out: Path) -> dict:
    """Train the text tokenizer and the three image tokenizers into ``out/tokenizers`` (each reused
    when already there)."""
    from fourm.tokenizers.training import load_training_config, train_tokenizer

    tok_dir = out / "tokenizers"
    report = {}
    for name in ("text", *IMAGE_TOKENIZERS):
        done = (tok_dir / "text" / "tokenizer.json") if name == "text" else (tok_dir / name / "model.safetensors")
        if done.is_file():
            report[name] = {"reused": True}
            continue
        overrides = [f"boxes.bins={config.tokenizers.box_bins or config.data.res}"] if name == "text" else [f"train.max_minutes={config.tokenizers.minutes[name]}", f"train.max_steps={config.tokenizers.max_steps}", f"train.batch_size={config.tokenizers.batch_size}", f"tokenizer.resolution={config.data.res}", *config.tokenizers.overrides]
        kind, cfg = load_training_config(REPO / "configs" / "tokenizers" / f"{name}.yaml", overrides)
        start = time.perf_counter()
        summary = train_tokenizer(kind, cfg, out / "data" / "train", tok_dir, val=None if kind == "text" else out / "data" / "val")
        entry = {"reused": False, "seconds": round(time.perf_counter() - start, 1)}
        if kind == "image":
            best = summary["history"]["val"][-1] if summary["history"]["val"] else {}
            entry.update(steps=summary["history"]["steps"], batch_size=cfg.train.batch_size, val={k: v for k, v in best.items() if k in ("psnr", "delta1", "abs_rel", "miou", "codebook_usage")})
        report[name] = entry
    return report


def _tokens_current(manifest: dict) -> bool:
    """Token shards that hold what the demo's model reads: rgb pixels and both label maps (shards
    from before rgb.pixels.npy, semseg.labels.npy or objects.labels.npy existed are made again)."""
    return "pixels" in manifest and {"semseg", OBJECT_LABELS} <= set(manifest.get("labels") or {})


def stage_pretokenize(config: DemoConfig, out: Path) -> dict:
    from fourm.tokenizers.pretokenize import pretokenize

    report = {}
    for split in ("train", "val"):
        target = out / "tokens" / split
        if (target / MANIFEST).is_file() and _tokens_current(json.loads((target / MANIFEST).read_text())):
            report[split] = {"reused": True}
            continue
        start = time.perf_counter()
        m = pretokenize(out / "tokenizers", out / "data" / split, target, overwrite=True)
        report[split] = {"reused": False, "samples": m["num_samples"], "seconds": round(time.perf_counter() - start, 1)}
    return report


def stage_train(config: DemoConfig, out: Path, minutes: float, deadline: float = 0.0) -> dict:
    """Train the any-to-any model for ``minutes`` (``model_minutes``); ``out/model`` is the final
    ``from_pretrained`` directory."""
    import shutil

    from fourm.config import load_config
    from fourm.training.data import DataSource
    from fourm.training.loop import TrainConfig, train

    if (out / "model" / "model.safetensors").is_file():
        return {"reused": True}
    cfg_path = REPO / "configs" / "train" / f"tiny_{config.model}.yaml"
    recipe = list(ENCDEC_DEMO_RECIPE) if config.model == "encdec" else []
    log.info("the model trains %.2f minutes (%s)", minutes, "train.minutes" if config.train.minutes > 0 else f"what the {config.budget_minutes:g}-minute budget leaves")
    timed = [f"deadline={deadline}", f"after_seconds={config.eval.reserve_seconds}", f"after_steps={config.eval.reserve_steps}"] if deadline else []
    overrides = [f"max_minutes={minutes}", *timed, f"max_steps={config.train.max_steps}", f"model_preset={REPO / 'configs' / 'models' / f'{config.model}_tiny.yaml'}", *recipe, *config.train.overrides]
    cfg = load_config(TrainConfig, cfg_path, overrides)
    cfg.data.sources = [DataSource(path=str(out / "tokens" / "train"))]
    start = time.perf_counter()
    summary = train(cfg, out / "train", resume=True)
    if (out / "model").exists():
        shutil.rmtree(out / "model")
    shutil.copytree(out / "train" / "final", out / "model")
    return {"reused": False, "minutes": cfg.max_minutes, "planned_minutes": minutes, "steps": summary["steps"], "tokens": summary["tokens"], "last": summary["last"], "seconds": round(time.perf_counter() - start, 1)}


def _judge_path(out: Path) -> Path:
    """Where the demo keeps the caption -> rgb judge's segmenter (trained once, then reused)."""
    return out / "judge" / "segmenter.safetensors"


def _judge_config(config: DemoConfig):
    from fourm.eval.judge import JudgeConfig

    return JudgeConfig(steps=config.eval.judge_steps, max_minutes=config.eval.judge_minutes)


def stage_judge(config: DemoConfig, out: Path) -> dict:
    """The caption -> rgb judge's segmenter (``fourm.eval.judge``), trained into ``out/judge`` on
    the training split and the rgb tokenizer's round trips, or reused when it is there."""
    from fourm.eval.judge import load_or_train_segmenter
    from fourm.tokenizers.tokenizer_set import TokenizerSet

    path = _judge_path(out)
    if path.is_file():
        return {"reused": True}
    start = time.perf_counter()
    load_or_train_segmenter(path, out / "data" / "train", _judge_config(config), tokenizers=TokenizerSet.from_pretrained(out / "tokenizers"))
    return {"reused": False, "seconds": round(time.perf_counter() - start, 1)}


def stage_evaluate(config: DemoConfig, out: Path) -> dict:
    """The evaluation suite (``fourm.eval.suite``) on held-out scenes, with the floors from the
    training split and the caption -> rgb judge (trained into ``out/judge`` once, then reused)."""
    from fourm.eval.judge import load_or_train_segmenter
    from fourm.eval.suite import EvalConfig, check_targets, evaluate
    from fourm.generation.files import open_model

    saved = out / "evaluation.json"
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    if saved.is_file():
        previous = json.loads(saved.read_text())
        if previous.get("model_mtime_ns") == stamp:
            return {**previous, "reused": True}
    judge_path = _judge_path(out)
    jcfg = _judge_config(config)
    model, tok = open_model(out / "model", out / "tokenizers")
    judge = load_or_train_segmenter(judge_path, out / "data" / "train", jcfg, tokenizers=tok)
    report, _ = evaluate(model, tok, out / "data" / "val", EvalConfig(scenes=config.eval.scenes, steps=config.eval.steps, predict_steps=config.eval.predict_steps, judge=jcfg), train_dir=out / "data" / "train", judge=judge)
    report.update(targets=check_targets(report), judge=str(judge_path), model_mtime_ns=stamp, reused=False)
    saved.write_text(json.dumps(report, indent=1) + "\n")
    return report


def stage_samples(config: DemoConfig, out: Path) -> dict:
    """Held-out scenes: rgb -> depth, semseg, boxes, caption and caption -> rgb, as pictures (the
    figures are the evaluate stage's)."""
    from fourm.generation.api import GenerationConfig, generate, text_to_image_config
    from fourm.models.build import load_model
    from fourm.tokenizers.tokenizer_set import TokenizerSet

    n = config.sample_scenes
    if n == 0:
        return {}
    model = load_model(out / "model")
    tok = TokenizerSet.from_pretrained(out / "tokenizers")
    loader, _ = build_loader(out / "data" / "val", LoaderConfig(modalities=("rgb", "depth", "semseg", "boxes", "caption"), batch_size=n, shuffle=0, num_workers=0))
    batch = next(iter(loader))
    gen = GenerationConfig(temperature=0.0, steps=8, max_len=96, per_target={"rgb": {"temperature": 1.0, "top_k": 50}})
    preds = {}
    start = time.perf_counter()
    for target in ("depth", "semseg", "boxes", "caption"):
        preds[target] = generate(model, tok, {"rgb": batch["rgb"]}, [target], gen).outputs[target]
    images = generate(model, tok, {"caption": batch["caption"]}, ["rgb"], text_to_image_config()).outputs["rgb"]
    seconds = time.perf_counter() - start
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(len(batch["caption"])):
        rgb = batch["rgb"][i].permute(1, 2, 0).numpy()
        s = max(1, 128 // rgb.shape[0])
        rows.append([
            upscale(rgb, s),
            upscale(colorize_depth(preds["depth"][i][0].numpy(), 1.0, 40.0), s), upscale(colorize_depth(batch["depth"][i, 0].numpy(), 1.0, 40.0), s),
            upscale(overlay(rgb, preds["semseg"][i].numpy()), s), upscale(overlay(rgb, batch["semseg"][i].numpy()), s),
            draw_boxes(rgb, preds["boxes"][i], s), draw_boxes(rgb, batch["boxes"][i], s),
            caption_strip("pred: " + preds["caption"][i] + "  |  true: " + batch["caption"][i], 3 * 64 * s // 2),
        ])
    headers = ["rgb (input)", "depth: model", "depth: true", "semseg: model", "semseg: true", "boxes: model", "boxes: true", "caption: model | true"]
    picture = grid(rows, headers=headers)
    classes = json.loads((out / "data" / "val" / MANIFEST).read_text()).get("classes", [])
    if classes:  # the key to the semseg overlays' colours
        picture = np.concatenate([picture, semseg_legend(["semseg: " + classes[0], *classes[1:]], picture.shape[1])], 0)
    Image.fromarray(picture).save(samples / "rgb_to_all.png")
    strip = [[upscale(img.permute(1, 2, 0).numpy(), 2), caption_strip(c, 128)] for img, c in zip(images, batch["caption"])]
    Image.fromarray(grid(strip, headers=["rgb: model", "caption (input)"])).save(samples / "caption_to_rgb.png")
    return {
        "scenes": len(batch["caption"]),
        "seconds": round(seconds, 1),
        "captions": [{"pred": p, "true": t} for p, t in zip(preds["caption"], batch["caption"])][:4],
        "grids": [str(samples / "rgb_to_all.png"), str(samples / "caption_to_rgb.png")],
    }
