"""fourm: any-to-any multimodal foundation models.

Modality tokenizers map text, RGB, depth, semantic segmentation and boxes into one shared
discrete vocabulary; one transformer learns to predict any subset of modalities from any other.
See ``DESIGN.md`` in the shared folder and ``README.md`` for the layout and data flow.
"""

__version__ = "0.1.0"


def build_model(source, vocab=None, overrides=()):
    """Build a model from a config dataclass, dict or YAML path (see ``fourm.models.build``)."""
    from fourm.models.build import build_model as _build

    return _build(source, vocab, overrides)


def load_model(directory, map_location: str = "cpu"):
    """Load whichever architecture a ``save_pretrained`` directory holds."""
    from fourm.models.build import load_model as _load

    return _load(directory, map_location)
