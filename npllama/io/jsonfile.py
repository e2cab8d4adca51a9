"""JSON from files a user hands over, read with bounds: a regular file, a size cap, a nesting cap.

Python's json module recurses per nesting level, so a header of a million '[' ends in a
RecursionError; and a config.json that is really /dev/zero or a FIFO would read forever. The
nesting depth is measured before parsing, at C speed, and every failure here is a ValueError
(or an OSError) whose message the caller prefixes with the file it was reading.
"""
from __future__ import annotations

import json
import os
import re
import stat
from typing import Any

import numpy as np

MAX_DEPTH = 64                      # real configs and headers nest 3 or 4 deep
MAX_BYTES = 64 * 2 ** 20            # config.json / index files are kilobytes
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def nesting_depth(data: bytes) -> int:
    """The deepest [ / { nesting in JSON text (brackets inside strings do not count)."""
    b = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    step = (b == ord("[")).astype(np.int64) + (b == ord("{")) - (b == ord("]")) - (b == ord("}"))
    return int(np.cumsum(step).max(initial=0))


def loads(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads with the nesting depth checked first; every failure is a ValueError."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep (at most {max_depth} allowed)")
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:  # cannot happen below MAX_DEPTH; kept so no RecursionError ever leaks
        raise ValueError("JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and ints past Python's digit limit
        raise ValueError(f"not valid JSON ({e})") from None


def read(path: str, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse a JSON file after checking it is a regular file of at most `max_bytes`; OSError/ValueError on failure."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")
    if st.st_size > max_bytes:
        raise ValueError(f"{st.st_size} bytes, more than the {max_bytes} a JSON file here may have")
    with open(path, "rb") as f:
        data = f.read(st.st_size + 1)  # read(n) allocates n bytes up front: ask for what the file holds
    if len(data) > max_bytes:
        raise ValueError(f"more than the {max_bytes} bytes a JSON file here may have")
    return loads(data, max_depth)
