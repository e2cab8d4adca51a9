"""`python -m npllama`, `run.py` and the `npllama` console script: the CLI, with Ctrl-C during start-up an exit 130.

This module imports nothing heavy itself, so an interrupt while NumPy or the CLI loads is caught here.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Import the CLI and run it; Ctrl-C at any point exits with code 130 and no traceback."""
    try:
        from npllama.cli import main as cli_main
        return cli_main(argv)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
