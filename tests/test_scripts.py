"""The README's two commands: scripts/main.sh hands its arguments to `alignkit quickstart`, not to the set-up
it sources (which reads its first argument as pip extras)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_main_sh_passes_its_arguments_to_quickstart_only(tmp_path):
    """main.sh run from a copy whose setup-env.sh and alignkit are stand-ins that record what they were given."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    shutil.copy(ROOT / "scripts" / "main.sh", scripts / "main.sh")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (scripts / "setup-env.sh").write_text(
        f'echo "extras=[${{1:-}}] count=$#" > "{tmp_path}/setup.txt"\nVENV="{tmp_path}/.venv"\n'
    )
    (venv_bin / "alignkit").write_text(f'#!/usr/bin/env bash\necho "$@" > "{tmp_path}/alignkit.txt"\n')
    (venv_bin / "alignkit").chmod(0o755)
    subprocess.run(["bash", str(scripts / "main.sh"), "seed=1", "output_dir=out"], check=True, timeout=60)
    assert (tmp_path / "setup.txt").read_text().strip() == "extras=[] count=1"
    assert (tmp_path / "alignkit.txt").read_text().strip() == "quickstart seed=1 output_dir=out"
