"""`nasopt dashboard`: optuna-dashboard for a storage, bound to the loopback interface only.

What the dashboard shows of a nasopt trial: its params (the genes), its objective values, and
its user attrs, which the search loop fills for this purpose: ``arch`` (the arch in one line),
``metrics`` (accuracy, params, MACs, bytes), ``constraints`` (value - limit per budget; the
dashboard does not show ``set_constraint`` values), ``feasible``, ``strategy`` and ``seed``.
"""
from __future__ import annotations

import socket
from collections.abc import Callable

from nasopt.search import study as _study
from nasopt.core.errors import NasoptError

HOST = "127.0.0.1"  # never another interface: the dashboard has no authentication
DEFAULT_PORT = 8080


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise NasoptError(f"--port must be between 1 and 65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            raise NasoptError(f"port {port} on {HOST} is in use; choose another with --port N"
                              ) from None


def serve(url: str, port: int = DEFAULT_PORT, log: Callable[[str], None] = print) -> None:
    """Serve optuna-dashboard for the storage ``url`` on http://127.0.0.1:PORT until
    interrupted. The storage is opened (and checked) by nasopt; its password is never printed."""
    try:
        import optuna_dashboard
    except ImportError:
        raise NasoptError("optuna-dashboard is not installed; pip install optuna-dashboard"
                          ) from None
    storage = _study.open_storage(url)
    check_port(port)
    log(f"optuna-dashboard for {_study.mask_url(url)} on http://{HOST}:{port}/dashboard "
        f"(loopback only; Ctrl-C stops it). Trial user attrs: arch, metrics, constraints, "
        f"feasible, strategy, seed")
    try:
        optuna_dashboard.run_server(storage, host=HOST, port=port)
    except OSError as exc:
        raise NasoptError(f"the dashboard could not listen on {HOST}:{port} ({exc}); choose "
                          f"another --port") from None
