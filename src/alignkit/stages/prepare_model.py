"""Stage `prepare-model`: dequantise an embedded model (the GGUF shipped in a Python package) once into
the alignkit cache, so training and generation later load it in well under a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from alignkit.config import doc_field
from alignkit.models.embedded import DEFAULT_EMBEDDED, EMBEDDED_MODELS, prepare_embedded
from alignkit.stages import Stage


@dataclass
class PrepareModelConfig:
    """Which embedded model to prepare."""

    name: str = doc_field(
        DEFAULT_EMBEDDED, f"Embedded model to prepare (one of: {', '.join(sorted(EMBEDDED_MODELS))})."
    )


def run(cfg: PrepareModelConfig) -> dict:
    """Prepare ``cfg.name`` (a no-op when already prepared); return its directory and the time taken."""
    start = time.perf_counter()
    path = prepare_embedded(cfg.name)
    return {"path": str(path), "seconds": round(time.perf_counter() - start, 3)}


STAGE = Stage("prepare-model", PrepareModelConfig, run)
