"""fourm: any-to-any multimodal foundation models.

Modality tokenizers map text, RGB, depth, semantic segmentation and boxes into one shared
discrete vocabulary; one transformer learns to predict any subset of modalities from any other.
See ``DESIGN.md`` in the shared folder and ``README.md`` for the layout and data flow.
"""

__version__ = "0.1.0"
