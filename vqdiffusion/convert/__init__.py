"""Checkpoint conversion: explicit key maps with shape checks and strict accounting of every key."""
