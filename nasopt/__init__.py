"""nasopt: neural architecture search with compression objectives.

The Python API lives in :mod:`nasopt.api`; ``nasopt.load(path)`` loads an exported model.
"""
__version__ = "0.1.0"


def load(path):  # noqa: ANN001, ANN201 - thin facade over nasopt.api.load
    """Load a model exported by ``nasopt export`` (see :func:`nasopt.api.load`)."""
    from .api import load as _load
    return _load(path)
