"""Checkpoint facts: what a model is and what it weighs, read from headers without loading it."""
