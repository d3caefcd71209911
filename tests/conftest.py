"""Shared fixtures: small rendered datasets, program runner."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Runs compared across processes (resume against an uninterrupted run, two ranks against one) must
# take one precision: a timed choice can differ between runs of a tiny model. The timed choice
# itself is tested with an injected timer (test_precision.py, test_training.py).
os.environ.setdefault("FOURM_CPU_BF16", "0")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """40 scenes at 64 px in shards of 10 (seed 3)."""
    from fourm.data.synth.generate import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, 40, res=64, seed=3, shard_size=10, workers=2, progress=False)
    return out


def rewrite_tar(path, edit) -> None:
    """Rewrite a tar in place: ``edit(member name, bytes)`` returns new bytes, or None to drop it."""
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(path, "w") as dst:
        for m, data in members:
            data = edit(m.name, data)
            if data is None:
                continue
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))


def run_program(script: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a repo program (``data_pipelines/synth_scenes.py`` ...) with this interpreter; ``env``
    adds to the environment."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, no traceback, and exactly one error line (the last line on stderr; warnings logged
    before it may precede it) that mentions every needle."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory, synth_dir) -> Path:
    """Token shards of ``synth_dir`` (4 shards of 10) made with a small, untrained tokenizer set."""
    from fourm.bench.speed import untrained_tokenizer_set
    from fourm.tokenizers.pretokenize import pretokenize

    root = tmp_path_factory.mktemp("tokens")
    untrained_tokenizer_set(synth_dir).save_pretrained(root / "tok")
    pretokenize(root / "tok", synth_dir, root / "train", shard_size=10, progress=False)
    return root / "train"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, token_dir) -> Path:
    """An untrained tiny encoder-decoder (dim 64) saved with ``save_pretrained``, its tokenizer set
    (``token_dir``'s) recorded in ``tokenizers.json``: for generation programs and the playground."""
    import json

    import torch

    from fourm.models.build import build_model
    from fourm.tokenizers.tokenizer_set import TokenizerSet

    tok = TokenizerSet.from_pretrained(token_dir.parent / "tok")
    torch.manual_seed(0)
    model = build_model(REPO / "configs/models/encdec_tiny.yaml", vocab=tok.vocab, overrides=["dim=64"]).eval()
    d = tmp_path_factory.mktemp("tiny_model") / "model"
    model.save_pretrained(d, vocab=tok.vocab)
    (d / "tokenizers.json").write_text(json.dumps({"tokenizers": str(token_dir.parent / "tok")}))
    return d
