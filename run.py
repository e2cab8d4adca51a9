"""npllama's command line; `python run.py --help` lists the subcommands."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from npllama.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
