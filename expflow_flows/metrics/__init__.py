"""Metrics: the registry, gates and their ``op:value`` grammar, and compare."""
