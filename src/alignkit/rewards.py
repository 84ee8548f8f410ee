"""Deprecated: moved to ``alignkit.scoring.rewards``; this path (and ``reward=alignkit.rewards:NAME``) works
for one release."""

import warnings

from alignkit.errors import AlignkitDeprecationWarning
from alignkit.scoring.rewards import *  # noqa: F403

warnings.warn("alignkit.rewards is deprecated; use alignkit.scoring.rewards", AlignkitDeprecationWarning, 2)
