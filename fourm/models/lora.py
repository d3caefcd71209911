"""LoRA adaptation through ``peft``: a frozen base, low-rank adapters, and (for a grown vocabulary)
only the new ids' rows of the token tables trained.

    model = apply_lora(base, LoraSettings(enabled=True, r=8), new_ids, new_modalities)   # PeftModel
    save_adapter(model, "adapter/", vocab, tokenizers="tok/")      # adapter_config.json + adapter_model.safetensors
    model, vocab = load_adapters("base/", {"normals": "adapter/"})  # PeftModel, adapters switchable
    merged = model.merge_and_unload()                               # a plain fourm model

Targets are named by group (``attention``: the fused q/k/v projection ``attn.wqkv`` and the output
``attn.wo``; ``mlp``: ``mlp.gate``, ``mlp.up``, ``mlp.down``; ``cross``: the decoder's
cross-attention ``cross.wq``, ``cross.wkv``, ``cross.wo``) or by module-name suffix. The rows of
ids a grown vocabulary added (``fourm/models/grow.py``) train through peft's
``trainable_token_indices`` (in ``embed`` and/or ``lm_head``, plus new modalities' rows of the
encoder-decoder's ``modality_embeddings``): a 1,000-code modality costs 1,000 rows per table, not
the whole table as ``modules_to_save`` would.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fourm.vocab import VOCAB_FILE, SharedVocab

log = logging.getLogger(__name__)

TARGET_GROUPS = {
    "attention": ["attn.wqkv", "attn.wo"],
    "mlp": ["mlp.gate", "mlp.up", "mlp.down"],
    "cross": ["cross.wq", "cross.wkv", "cross.wo"],
}
TOKEN_TABLES = ("embed", "lm_head")
ADAPTER_FILE = "adapter.json"
ADAPTER_FORMAT = "fourm-adapter/1"


@dataclass
class LoraSettings:
    """The ``lora:`` block of a training config.

    Attributes:
        enabled: train adapters on a frozen ``init_from`` base instead of every weight.
        r, alpha, dropout: LoRA rank, scaling numerator (scale = alpha / r) and dropout.
        targets: groups (``attention``, ``mlp``, ``cross``) or module-name suffixes (``attn.wo``);
            ``cross`` is skipped for decoder-only models.
        new_tokens: which token tables train the rows of ids the vocabulary grew by: ``lm_head``
            (outputs of a new modality), ``embed`` (inputs; the encoder-decoder's image targets are
            [MASK] queries, so a new image target needs only ``lm_head``).
        modules_to_save: other modules trained in full (peft's ``modules_to_save``), e.g. ``dec_norm``.
    """

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention", "mlp", "cross"])
    new_tokens: list[str] = field(default_factory=lambda: ["lm_head", "embed"])
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora.targets names no module")
        unknown = set(self.new_tokens) - set(TOKEN_TABLES)
        if unknown:
            raise ValueError(f"lora.new_tokens: unknown table(s) {sorted(unknown)}; known: {', '.join(TOKEN_TABLES)}")

    def target_modules(self, arch: str) -> list[str]:
        """Module-name suffixes for peft's ``target_modules``."""
        names: list[str] = []
        for t in self.targets:
            if t == "cross" and arch != "encdec":
                continue
            names += TARGET_GROUPS.get(t, [t])
        return names


def apply_lora(model: torch.nn.Module, settings: LoraSettings, new_ids: list[int] = (), new_modalities: list[int] = (), adapter_name: str = "default"):
    """Wrap ``model`` in a ``peft.PeftModel``: base frozen, adapters (and new rows) trainable.

    Args:
        new_ids: ids a grown vocabulary added (``grow.new_token_ids``); their rows train.
        new_modalities: indices of added modalities in ``config.modalities`` (encoder-decoder).
    """
    from peft import LoraConfig, get_peft_model

    tokens: dict[str, list[int]] = {}
    if len(new_ids):
        for table in settings.new_tokens:
            tokens[table] = list(new_ids)
    if len(new_modalities) and hasattr(model, "modality_embeddings"):
        tokens["modality_embeddings"] = list(new_modalities)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules(model.config.arch),
        trainable_token_indices=tokens or None,
        modules_to_save=list(settings.modules_to_save) or None,
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    trainable, total = trainable_parameters(peft_model)
    log.info("LoRA r=%d on %s: %d trainable parameters of %d in the base (%.2f%%)", settings.r, ", ".join(sorted(config.target_modules)), trainable, total, 100 * trainable / max(total, 1))
    return peft_model


def trainable_parameters(peft_model) -> tuple[int, int]:
    """(trainable parameters, parameters of the base model alone)."""
    added = ("lora_", "trainable_tokens_", "modules_to_save.")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in peft_model.named_parameters() if not any(a in n for a in added))
    return trainable, base


def save_adapter(peft_model, directory: str | Path, vocab: SharedVocab, base_vocab_size: int, tokenizers: str | None = None, base: str | None = None) -> None:
    """peft's own files (``adapter_config.json`` + ``adapter_model.safetensors``) and, next to them,
    the vocabulary the adapter was trained on, ``adapter.json`` and the tokenizer set's path."""
    directory = Path(directory)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = str(base) if base else None
    # the grown rows are in the adapter (trainable tokens); the base is grown again on load
    peft_model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
    vocab.save(directory / VOCAB_FILE)
    meta = {"format": ADAPTER_FORMAT, "arch": peft_model.get_base_model().config.arch, "base": str(base) if base else None, "base_vocab_size": base_vocab_size, "vocab_size": vocab.size}
    (directory / ADAPTER_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    (directory / "tokenizers.json").write_text(json.dumps({"tokenizers": tokenizers}) + "\n")


def is_adapter_dir(directory: str | Path) -> bool:
    return (Path(directory) / "adapter_config.json").is_file() and (Path(directory) / ADAPTER_FILE).is_file()


def load_adapters(base_dir: str | Path, adapters: dict[str, str | Path] | list[str | Path]):
    """Load a base model once and attach adapters to it; the first is active
    (``model.set_adapter(name)`` switches, ``with model.disable_adapter():`` runs the base).

    Returns:
        (peft.PeftModel in eval mode, the adapters' SharedVocab).
    Raises:
        ValueError: a missing file, an adapter for another architecture, adapters trained on
            different vocabularies, or a vocabulary that does not extend the base's.
    """
    from peft import PeftModel

    from fourm.models.build import load_model
    from fourm.models.grow import fit_to_vocab

    if not isinstance(adapters, dict):
        adapters = {Path(d).name or f"adapter{i}": d for i, d in enumerate(adapters)}
    if not adapters:
        raise ValueError("no adapter given")
    base_dir = Path(base_dir)
    for name, d in adapters.items():
        if not is_adapter_dir(d):
            raise ValueError(f"adapter {name}: {d} is not a fourm adapter directory (needs adapter_config.json and {ADAPTER_FILE})")
    if not (base_dir / VOCAB_FILE).is_file():
        raise ValueError(f"--model {base_dir}: missing {base_dir / VOCAB_FILE}")
    base_vocab = SharedVocab.load(base_dir / VOCAB_FILE)
    vocabs = {name: SharedVocab.load(Path(d) / VOCAB_FILE) for name, d in adapters.items()}
    first = next(iter(vocabs))
    for name, v in vocabs.items():
        if v.to_json() != vocabs[first].to_json():
            raise ValueError(f"adapters {first!r} and {name!r} were trained on different vocabularies; load them on separate bases")
    model = load_model(base_dir)
    for name, d in adapters.items():
        arch = json.loads((Path(d) / ADAPTER_FILE).read_text()).get("arch")
        if arch != model.config.arch:
            raise ValueError(f"adapter {name} is for a {arch} model, {base_dir} holds a {model.config.arch}")
    vocab = vocabs[first]
    model = fit_to_vocab(model, base_vocab, vocab)
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapters[name]), adapter_name=name)
    peft_model.set_adapter(names[0])
    return peft_model.eval(), vocab
