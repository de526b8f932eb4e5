"""Runs: the trainable contract, run folders and what a run records."""
