"""nasopt: neural architecture search with compression objectives.

The Python API lives in :mod:`nasopt.api`; ``nasopt.load(path)`` loads an exported model.
Writing a search space of your own (docs/writing-a-space.md) takes only what this package
exports: ``SearchSpace``, ``ElasticNetwork``, the elastic layers and the channel-sorting helpers,
and ``compression_genes``; :mod:`nasopt.testing` checks it. Importing ``nasopt`` imports no torch.
"""
__version__ = "0.1.0"

#: the public names for writing a space, and the module each one lives in (imported on first use)
_PUBLIC = {
    "SearchSpace": "nasopt.core.space",
    "ElasticNetwork": "nasopt.supernet.network",
    "ElasticConv1d": "nasopt.supernet.elastic",
    "ElasticConv2d": "nasopt.supernet.elastic",
    "ElasticLinear": "nasopt.supernet.elastic",
    "ElasticBatchNorm1d": "nasopt.supernet.elastic",
    "ElasticBatchNorm2d": "nasopt.supernet.elastic",
    "importance": "nasopt.supernet.elastic",
    "permute_": "nasopt.supernet.elastic",
    "permute_bn_": "nasopt.supernet.elastic",
    "compression_genes": "nasopt.compression.compress",
    "load_dataset": "nasopt.core.data",
}
__all__ = ["load", *_PUBLIC]


def load(path):  # noqa: ANN001, ANN201 - thin facade over nasopt.api.load
    """Load a model exported by ``nasopt export`` (see :func:`nasopt.api.load`)."""
    from nasopt.api import load as _load
    return _load(path)


def __getattr__(name: str):  # noqa: ANN202 - lazy: `import nasopt` stays light
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'nasopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
