"""Typed configs: every shipped config parses; unknown keys and wrong types are rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from fourm.cli import UsageError
from fourm.config import load_config, to_dict
from fourm.demo import DemoConfig
from fourm.tokenizers.training import load_training_config
from fourm.modalities import MODALITIES, get_modality, parse_modalities

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG_CLASSES = {"demo.yaml": DemoConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_parses(path):
    rel = str(path.relative_to(CONFIGS))
    if rel.startswith("train/"):
        from fourm.training.loop import TrainConfig

        config = load_config(TrainConfig, path)
        assert config.lora.enabled and not config.model_preset or Path(config.model_preset).name in {p.name for p in (CONFIGS / "models").glob("*.yaml")}
    elif rel.startswith("models/"):
        from fourm.models.build import make_config

        config = make_config(path)
    elif rel.startswith("tokenizers/"):
        kind, config = load_training_config(path, [])
        assert kind in ("image", "text")
        if kind == "image":
            from fourm.tokenizers.image import ImageTokenizer

            assert ImageTokenizer(config.tokenizer).config.grid == 8
    else:
        config = load_config(CONFIG_CLASSES[rel], path)
    assert to_dict(config)


def test_overrides_unknown_keys_and_types():
    cfg = load_config(DemoConfig, {"data": {"res": 128}}, ["data.val_scenes=7"])
    assert cfg.data.res == 128 and cfg.data.val_scenes == 7
    with pytest.raises(UsageError, match="typo"):
        load_config(DemoConfig, {"data": {"typo": 1}})
    with pytest.raises(UsageError):
        load_config(DemoConfig, None, ["data.res=big"])
    with pytest.raises(UsageError, match="key=value"):
        load_config(DemoConfig, None, ["data.res"])


def test_modality_registry():
    assert list(MODALITIES)[:5] == ["rgb", "depth", "semseg", "boxes", "caption"]
    assert parse_modalities("rgb, depth") == ("rgb", "depth")
    with pytest.raises(KeyError, match="known: rgb"):
        get_modality("thermal")
    with pytest.raises(ValueError):
        parse_modalities("rgb,rgb")
    with pytest.raises(ValueError):
        parse_modalities("")


@pytest.mark.parametrize("path", sorted((CONFIGS / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_fill(path):
    from fourm.training.engine import load_deepspeed_config

    cfg = load_deepspeed_config(str(path), micro_batch=4, grad_accum=2, grad_clip=1.0)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"]["stage"] in (2, 3)


def test_plan_program():
    from conftest import run_program

    proc = run_program("launch/plan.py", "--config", "configs/train/b_encdec.yaml", "--gpus", "8", "--nodes", "2")
    assert proc.returncode == 0, proc.stderr
    assert "encdec:" in proc.stdout and "tokens per optimizer step" in proc.stdout and "GiB per GPU" in proc.stdout
