"""The `alignkit` command: `alignkit <stage> [CONFIG.yaml] [key=value ...]`.

Each stage is a `Stage` (``alignkit.stages``: its config dataclass and the function that runs it), named in the
table ``STAGES``; this file only resolves the configuration, runs the stage, prints the summary, and turns the
errors users cause into a message and an exit code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignkit import __version__
from alignkit.config import ConfigError, config_help, load_config
from alignkit.errors import AlignkitError, TrainingInterrupted
from alignkit.stages import STAGES, Stage, load_stage, unknown_stage_message

USAGE = "usage: alignkit <stage> [CONFIG.yaml] [key=value ...]"
EXIT_USAGE = 2  # bad configuration or data: the argparse convention for "you asked for something wrong"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a run stopped with Ctrl-C
DEBUG_FLAG = "--debug"  # or ALIGNKIT_DEBUG=1: the full traceback of a user error too, not just its message
BUG_HINT = (
    "unexpected error: a bug in alignkit, not a problem with your input; please report it with the traceback "
    "below (and alignkit --version, the command, the config)"
)

VALUES_NOTE = """\
Settings come from the defaults below, then CONFIG.yaml (a mapping of key: value), then the key=value
arguments in order, the later winning. Values are read as YAML: 1e-5, true/false, null (or None),
[a,b] (or a,b) for lists; text is taken as written."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the process exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # stdout was closed early (`alignkit ppo --help | head`): not an error of alignkit's. Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again (Python docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def console() -> None:
    """The `alignkit` console script and `python -m alignkit`: ``main()``, then exit with its code.

    A process of a multi-process launch (torchrun sets WORLD_SIZE) whose run finished ends with ``os._exit``
    once its output is flushed and its process group destroyed: everything it writes is closed by then, and
    interpreter shutdown is where Gloo's C++ threads can still be joinable and abort a successful rank
    ("terminate called without an active exception", SIGABRT; seen on a loaded 2-core machine even after
    ``close_process_group``). A failed run exits normally, with its traceback or error line."""
    code = main()
    if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)


def _resume_command(
    stage: str, spec: Stage, yaml_path: str | None, overrides: list[str], checkpoint: str
) -> list[str]:
    """The arguments that continue an interrupted run.

    A training stage continues from ``resume_from=<checkpoint>``. A pipeline (compare, quickstart) has no such
    setting: it resumes its interrupted stage by itself, so the same command, unchanged, is the way back.
    """
    command = [stage, *([yaml_path] if yaml_path else [])]
    if "resume_from" not in {f.name for f in dataclasses.fields(spec.config)}:
        return [*command, *overrides]
    kept = [o for o in overrides if not o.startswith("resume_from=")]
    return [*command, *kept, f"resume_from={checkpoint}"]


def _main(argv: list[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args or os.environ.get("ALIGNKIT_DEBUG", "").strip().lower() in ("1", "true", "yes")
    args = [arg for arg in args if arg != DEBUG_FLAG]
    if not args:
        print(main_help(), file=sys.stderr)
        return EXIT_USAGE
    if args[0] in ("-h", "--help", "help"):
        print(main_help())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"alignkit {__version__}")
        return 0
    stage = args[0]
    if stage not in STAGES:
        return _fail(unknown_stage_message(stage))

    spec = load_stage(stage)
    rest = args[1:]
    if "-h" in rest or "--help" in rest:
        print(stage_help(stage, spec.config))
        return 0
    yaml_path, overrides = split_args(positional_to_override(spec, rest))

    try:
        cfg = load_config(spec.config, yaml_path, overrides)
        summary = spec.main(cfg)
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        if e.checkpoint:
            resume = _resume_command(stage, spec, yaml_path, overrides, e.checkpoint)
            print(f"resume with: alignkit {shlex.join(resume)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        # Ctrl-C before the training loop took over SIGINT (loading, tokenizing): nothing new to resume. (The
        # loops turn a second signal into TrainingInterrupted naming the newest intact checkpoint.) A resumed
        # run's earlier checkpoints are still there, so do not claim there are none.
        print("interrupted before training started; no new checkpoint was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        message = user_error_message(e, stage)
        if message is None:
            # A bug: it propagates (Python prints its traceback and exits 1; a caller of main() gets it).
            print(f"alignkit: {BUG_HINT}", file=sys.stderr)
            raise
        if debug:
            traceback.print_exc()
        return _fail(message)

    # The summary as JSON on stdout (pipe it to jq), unless the stage prints its own results table; in a
    # multi-process launch once, by the main process (rank 0), which wrote the run folder it describes.
    main_process = int(os.environ.get("RANK", "0")) == 0
    if summary is not None and main_process and not spec.prints_results:
        print(json.dumps(summary, indent=2, default=str))
    if "torch.distributed" in sys.modules:  # a stage that ran loaded torch; `--help` and the like did not
        from alignkit.training.distributed import close_process_group

        close_process_group()
    return 0


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] key=value ...`` -> (config path or None, overrides).

    The first argument is the config file when it has no '=' and names a YAML file (or any existing
    file); anything else is an override, and a malformed one is reported by ``load_config``.
    """
    if args and "=" not in args[0] and not args[0].startswith("-"):
        first = args[0]
        if first.endswith((".yaml", ".yml")) or Path(first).is_file():
            return first, args[1:]
    return None, list(args)


def positional_to_override(stage: Stage, args: list[str]) -> list[str]:
    """``alignkit report runs/dpo-1`` -> ``run_dir=runs/dpo-1``: a stage that names a ``positional`` field
    takes a bare first argument as that field, unless it is the YAML config file."""
    field_name = stage.positional
    if field_name and args and "=" not in args[0] and not args[0].startswith("-"):
        first = args[0]
        if not (first.endswith((".yaml", ".yml")) or Path(first).is_file()):
            return [f"{field_name}={first}", *args[1:]]
    return args


def main_help() -> str:
    width = max(len(name) for name in STAGES)
    stages = "\n".join(f"  {name:<{width}}  {doc}" for name, (_, doc) in STAGES.items())
    return (
        f"{USAGE}\n"
        "       alignkit <stage> --help   every setting of a stage, with its default and doc\n"
        "       alignkit <stage> ... --debug   on an error, the full traceback too (or ALIGNKIT_DEBUG=1)\n"
        "       alignkit --version\n\n"
        "Align language models with human and AI preferences.\n\n"
        f"stages:\n{stages}"
    )


def stage_help(stage: str, cls: type) -> str:
    lines = [f"usage: alignkit {stage} [CONFIG.yaml] [key=value ...]", "", STAGES[stage][1] + "."]
    doc = (cls.__doc__ or "").strip()
    # @dataclass writes a signature as the docstring of a class that has none; that is no help here.
    if doc and not doc.startswith(f"{cls.__name__}("):
        lines.append(doc)
    lines += ["", VALUES_NOTE, "", "settings:", config_help(cls).rstrip()]
    return "\n".join(lines)


def _path_message(error: OSError) -> str:
    """"data.jsonl: permission denied" rather than "[Errno 13] Permission denied: 'data.jsonl'"; an error
    raised with its own message (no filename) keeps it."""
    if error.filename is None or error.strerror is None:
        return str(error)
    return f"{error.filename}: {error.strerror[:1].lower()}{error.strerror[1:]}"


# The errors users cause, matched in this order, and their one-line messages (given the stage). The library's
# own errors are AlignkitError: ConfigError, BadRowError and DataSourceError (data), ModelLoadError (models),
# and the checkpoint and run-folder refusals. The OS errors are those of the paths users name (data files,
# model and output folders). Anything else is a bug: it keeps its traceback. TrainingInterrupted (exit 130,
# with the resume command) has its own branch in main.
USER_ERRORS: tuple[tuple[type[BaseException], Callable[[Any, str], str]], ...] = (
    (ConfigError, lambda e, stage: f"{e}\n(`alignkit {stage} --help` lists every setting)"),
    (AlignkitError, lambda e, stage: str(e)),
    (FileNotFoundError, lambda e, stage: _path_message(e)),
    (PermissionError, lambda e, stage: _path_message(e)),
    (IsADirectoryError, lambda e, stage: _path_message(e)),
    (NotADirectoryError, lambda e, stage: _path_message(e)),
)


def user_error_message(error: BaseException, stage: str) -> str | None:
    """The message of an error the user caused (printed as ``error: <message>``, exit 2); None for a bug."""
    for error_type, message in USER_ERRORS:
        if isinstance(error, error_type):
            return message(error, stage)
    return None


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE
