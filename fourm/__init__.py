"""fourm: any-to-any multimodal foundation models.

Modality tokenizers map text, RGB, depth, semantic segmentation and boxes into one shared
discrete vocabulary; one transformer learns to predict any subset of modalities from any other.
See ``DESIGN.md`` in the shared folder and ``README.md`` for the layout and data flow.
"""

__version__ = "0.1.0"

# The layers, lowest first. A module imports only modules of lower layers and, within its own
# layer, only its own unit (a package or a module): the foundations (single modules) may build on
# one another, the packages of a higher layer stand side by side. No module imports this one (it
# stands above them all: ``build_model``/``load_model`` below reach down into ``fourm.models``).
# ``tests/test_layers.py`` checks every import in the source (function-level ones too) against
# this table, and that no import cycle exists; DESIGN.md's "Layers" and docs/architecture.md show it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundations", ("modalities", "vocab", "cli", "config", "precision", "sequence", "schedule", "metrics", "weights", "viz")),
    ("data", ("data",)),
    ("tokens and networks", ("tokenizers", "models", "objectives")),
    ("training and generation", ("training", "generation")),
    ("evaluation and benchmarks", ("eval", "bench")),
    ("applications", ("demo", "playground")),
)


def build_model(source, vocab=None, overrides=()):
    """Build a model from a config dataclass, dict or YAML path (see ``fourm.models.build``)."""
    from fourm.models.build import build_model as _build

    return _build(source, vocab, overrides)


def load_model(directory, map_location: str = "cpu"):
    """Load whichever architecture a ``save_pretrained`` directory holds."""
    from fourm.models.build import load_model as _load

    return _load(directory, map_location)
