"""Deprecated: moved to ``alignkit.scoring.rankers``; this path works for one release."""

import warnings

from alignkit.errors import AlignkitDeprecationWarning
from alignkit.scoring.rankers import *  # noqa: F403

warnings.warn("alignkit.rankers is deprecated; use alignkit.scoring.rankers", AlignkitDeprecationWarning, 2)
