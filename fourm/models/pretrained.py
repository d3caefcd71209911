"""``save_pretrained`` / ``from_pretrained`` methods for both architectures (see ``build.py``)."""

from __future__ import annotations

import os


class Pretrained:
    """Mixin: ``model.save_pretrained(dir, vocab=None)`` and ``Class.from_pretrained(dir)``."""

    def save_pretrained(self, directory: str | os.PathLike, vocab=None) -> None:
        from fourm.models.build import save_pretrained

        save_pretrained(self, directory, vocab)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu"):
        from fourm.models.build import load_model

        model = load_model(directory, map_location)
        if not isinstance(model, cls):
            raise TypeError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}; use fourm.load_model")
        return model
