"""docs/architecture.md names only what exists: every source path it gives (``src/alignkit/...``,
``alignkit/...py``, ``training/run.py``) is a file of the tree, every dotted ``alignkit.x`` module is a module,
and every package under src/alignkit is on the map."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "src" / "alignkit"

# A path with at least one folder, ending .py: src/alignkit/config.py, alignkit/cli.py, stages/ppo.py.
PY_PATH = re.compile(r"(?<![\w./-])((?:[\w-]+/)+[\w-]+\.py)\b")
# A dotted module path: alignkit.scoring.rankers (the rest of a longer name may be an attribute).
DOTTED = re.compile(r"\balignkit(?:\.\w+)+")


def source_paths(text: str) -> list[str]:
    return sorted(set(PY_PATH.findall(text)))


def exists(path: str) -> bool:
    """``path`` as written, from the repository root, from src/, or from inside the package."""
    return any((base / path).is_file() for base in (ROOT, ROOT / "src", PACKAGE))


def module_exists(dotted: str) -> bool:
    """The first name after ``alignkit.`` is a module or package of the tree (what follows it may be an
    attribute: alignkit.run, alignkit.config.load_config)."""
    first = dotted.split(".")[1]
    return (PACKAGE / f"{first}.py").is_file() or (PACKAGE / first / "__init__.py").is_file() or first in {
        "run",  # alignkit.run, the Python API (src/alignkit/__init__.py)
    }


def test_the_path_finder_reads_the_spellings_the_doc_uses():
    text = "see `src/alignkit/config.py`, alignkit/cli.py and training/run.py; not final/ or a.py"
    assert source_paths(text) == ["alignkit/cli.py", "src/alignkit/config.py", "training/run.py"]
    assert not exists("losses/sft.py")  # the stale path issue 17 found in the doc
    assert exists("training/online_engine.py") and exists("src/alignkit/stages/__init__.py")


def test_every_source_path_the_architecture_doc_names_exists():
    text = DOC.read_text(encoding="utf-8")
    paths = source_paths(text)
    assert len(paths) > 10  # the map names the modules; an empty match would prove nothing
    assert [p for p in paths if not exists(p)] == []


def test_every_dotted_module_the_architecture_doc_names_exists():
    names = set(DOTTED.findall(DOC.read_text(encoding="utf-8")))
    assert [n for n in sorted(names) if not module_exists(n)] == []


def test_every_package_is_on_the_map():
    text = DOC.read_text(encoding="utf-8")
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert [p for p in packages if f"{p}/" not in text] == []
