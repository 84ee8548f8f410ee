"""`python -m alignkit`: the same command line as the `alignkit` console script.

Guarded by ``__name__`` so importing this module (as the import test does) runs nothing.
"""

from __future__ import annotations

import sys

from alignkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
