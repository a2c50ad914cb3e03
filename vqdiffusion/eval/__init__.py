"""Evaluation: automatic scoring of generated images (the ``shapes`` detector in :mod:`.shapes`)."""
