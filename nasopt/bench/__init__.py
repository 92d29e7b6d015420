"""Benchmarks: commands (``nasopt bench ...``) whose reports are committed under results/."""
