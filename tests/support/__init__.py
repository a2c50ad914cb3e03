"""Shared test support: one definition of every helper that more than one test module uses.

* :mod:`support.weights`: random weights (``randomize_``), random models and pipelines saved to disk.
* :mod:`support.tokenizers`: tiny CLIP tokenizers and text encoders written locally, the authors' BPE file.
* :mod:`support.data`: tiny image, caption and token folders.

Importable as ``support`` because pytest puts the ``tests`` folder on ``sys.path`` (``rootdir`` layout, no
``tests/__init__.py``); DDP worker processes inherit that path.
"""
