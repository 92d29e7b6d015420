"""nasopt: neural architecture search with compression objectives.

The Python API lives in :mod:`nasopt.api`; ``nasopt.load(path)`` loads an exported model;
``nasopt.SearchSpace`` is the base class of a search space (your own: see
:mod:`nasopt.core.space_import` and :mod:`nasopt.testing`). Importing ``nasopt`` imports no torch.
"""
__version__ = "0.1.0"


def load(path):  # noqa: ANN001, ANN201 - thin facade over nasopt.api.load
    """Load a model exported by ``nasopt export`` (see :func:`nasopt.api.load`)."""
    from nasopt.api import load as _load
    return _load(path)


def __getattr__(name: str):  # noqa: ANN202 - lazy: `import nasopt` stays light
    if name == "SearchSpace":
        from nasopt.core.space import SearchSpace
        return SearchSpace
    raise AttributeError(f"module 'nasopt' has no attribute {name!r}")
