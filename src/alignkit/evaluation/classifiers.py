"""Deprecated: moved to ``alignkit.scoring.classifiers``; this path (and
``reward=alignkit.evaluation.classifiers:sentiment``) works for one release. The one import of evaluation/
from above it, until it goes."""

import warnings

from alignkit.errors import AlignkitDeprecationWarning
from alignkit.scoring.classifiers import *  # noqa: F403

warnings.warn(
    "alignkit.evaluation.classifiers is deprecated; use alignkit.scoring.classifiers",
    AlignkitDeprecationWarning,
    2,
)
