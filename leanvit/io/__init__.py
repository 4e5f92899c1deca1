"""Leaf input and output: weights (safe reading, converters, atomic saving), image data, exported files, and the
atomic file writes everything else uses."""
