"""The command line: generate | chat | train | eval | convert | bench (thin: parses, calls the package)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of `run.py` and the `npllama` console script."""
    print("npllama: the CLI arrives with the generation issue", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
