"""Search spaces, one module per family. ``SPACES`` maps a name to its SearchSpace class."""
from __future__ import annotations

from nasopt.core.space import SearchSpace

from nasopt.spaces.conv1d import Conv1dSpace
from nasopt.spaces.mobilenet import MobileNetSpace
from nasopt.spaces.nb201 import Nb201Space

SPACES: dict[str, type[SearchSpace]] = {cls.name: cls for cls in (Conv1dSpace, MobileNetSpace,
                                                                Nb201Space)}
