"""Compression genes applied to a standalone model (quantization, pruning, low rank), and the
packed file whose exact size is the size objective."""
