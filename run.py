"""npllama's command line; `python run.py --help` lists the subcommands."""
try:  # from the first statement on, so that Ctrl-C during the imports is an ordinary exit 130 too
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from npllama.__main__ import main
except KeyboardInterrupt:
    raise SystemExit(130) from None

if __name__ == "__main__":
    sys.exit(main())
