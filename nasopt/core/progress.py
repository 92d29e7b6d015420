"""Progress bars (tqdm on stderr, with ETA); one place decides whether they show."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int | None, desc: str, unit: str = "it", initial: int = 0,
                 enabled: bool = True) -> tqdm:
    # disable=None: tqdm shows bars only on a terminal, so logs and CI stay readable
    return tqdm(total=total, initial=initial, desc=desc, unit=unit,
                disable=None if enabled else True,
                file=sys.stderr, dynamic_ncols=True, leave=False)
