"""Data sets: image folders with captions, class folders, and the synthetic shapes set."""
