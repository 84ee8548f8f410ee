"""`python -m alignkit`: the same command line as the `alignkit` console script.

Guarded by ``__name__`` so importing this module (as the import test does) runs nothing.
"""

from __future__ import annotations

from alignkit.cli import console

if __name__ == "__main__":
    console()
