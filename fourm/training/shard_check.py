"""What a run needs against what its token shards hold, checked from the manifest before anything is
built or written: every modality a mixture setting names must be one fourm knows, be in the shards'
vocabulary and have samples in the shards; the shards must hold samples; a model to start from must
share the shards' vocabulary (or be extended by it). Each mismatch is one ``ShardMismatch``
(a ValueError) naming the modality, the shards and the command that mends it.
"""

from __future__ import annotations

from fourm.modalities import MODALITIES

# derived modalities data_pipelines/add_modalities.py makes from ones the shards already have
ADDABLE = ("normals", "count")


class ShardMismatch(ValueError):
    """The run's config or model asks for something the token shards do not hold."""


def needed_modalities(objective) -> dict[str, list[str]]:
    """{modality: [names of the mixture settings that ask for it]}: every modality a 4M masking
    setting names with a positive input or target alpha (``objective``: an ObjectiveConfig)."""
    needed: dict[str, list[str]] = {}
    for setting in objective.masking.settings:
        for alphas in (setting.input_alphas, setting.target_alphas):
            for modality, alpha in alphas.items():
                if alpha > 0 and setting.name not in needed.setdefault(modality, []):
                    needed[modality].append(setting.name)
    return needed


def how_to_add(modality: str, shards: str) -> str:
    """The commands that put ``modality`` into token shards like ``shards``."""
    pretok = f"python data_pipelines/pretokenize.py --tokenizers TOKENIZERS --data RAW_PLUS --out NEW_TOKENS (a tokenizer set with {modality!r})"
    if modality in ADDABLE:
        return f"add it to the raw shards {shards} were made from with `python data_pipelines/add_modalities.py --src RAW --out RAW_PLUS --add {modality}`, then `{pretok}`"
    return f"pretokenize raw shards that hold {modality!r}: `{pretok.replace('RAW_PLUS', 'RAW')}`"


def check_shards_fit(manifest: dict, shards: str, objective, settings_key: str = "objective.masking.settings") -> None:
    """ShardMismatch unless the token shards described by ``manifest`` (at ``shards``) can serve
    ``objective``: samples, and every modality the mixture settings name (known, in the vocabulary,
    with samples)."""
    if not manifest.get("num_samples"):
        raise ShardMismatch(f"the token shards at {shards} hold no samples (their manifest counts {manifest.get('num_samples', 0)}): pretokenize raw shards that hold some (python data_pipelines/pretokenize.py)")
    for i, setting in enumerate(objective.masking.settings):
        for modality in list(setting.input_alphas) + list(setting.target_alphas):
            if modality not in MODALITIES:
                raise ShardMismatch(f"{settings_key}[{i}] ({setting.name!r}) names modality {modality!r}, which fourm does not know; known: {', '.join(MODALITIES)}")
    for modality, names in needed_modalities(objective).items():
        check_modality_held(manifest, shards, modality, f"mixture setting {', '.join(repr(n) for n in names)} asks for {modality!r}")


def check_modality_held(manifest: dict, shards: str, modality: str, asked: str) -> None:
    """ShardMismatch unless the token shards described by ``manifest`` (at ``shards``) hold samples
    of ``modality``; ``asked`` says who wants it (the start of the message)."""
    vocab_modalities = set(manifest.get("vocab", {}).get("modalities", {}))
    counts = manifest.get("modality_counts") or {m: manifest.get("num_samples", 0) for m in manifest.get("modalities", [])}
    if modality not in vocab_modalities:
        raise ShardMismatch(f"{asked}, but the token shards at {shards} were made with a vocabulary without it ({', '.join(sorted(vocab_modalities))}): {how_to_add(modality, shards)}")
    if not counts.get(modality):
        held = sorted(m for m, c in counts.items() if c)
        raise ShardMismatch(f"{asked}, but the token shards at {shards} hold no {modality!r} (they hold {', '.join(held)}): {how_to_add(modality, shards)}")


def check_model_vocab(model_dir: str, shards_vocab, shards: str) -> None:
    """ShardMismatch unless the model at ``model_dir`` has the shards' vocabulary or one they extend
    (``fourm.models.grow.check_extends``): shards of another vocabulary would be read as other tokens."""
    from pathlib import Path

    from fourm.models.grow import check_extends
    from fourm.vocab import VOCAB_FILE, SharedVocab

    path = Path(model_dir) / VOCAB_FILE
    if not path.is_file():
        return  # load_for_vocab says what is missing there
    model_vocab = SharedVocab.load(path)
    try:
        check_extends(model_vocab, shards_vocab)
    except ValueError as exn:
        raise ShardMismatch(f"the token shards at {shards} were made with another vocabulary than the model at {model_dir} ({exn}): pretokenize with the model's tokenizer set (its tokenizers.json names it), grown if the run adds modalities") from None
