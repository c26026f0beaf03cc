"""Writes the pickles numpy 1.x clients send, for ``tests/wire/test_fast_pickle.py``.

Run with numpy 1.x (the committed files were written by numpy 1.26.4 on Python 3.11)::

    python -m venv /tmp/np1 && /tmp/np1/bin/pip install 'numpy<2'
    /tmp/np1/bin/python tests/wire/numpy1/make_bodies.py

Each file is ``pickle.dumps(values(), protocol=P)``; the test rebuilds ``values()`` with the
numpy it runs on and compares.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

PROTOCOLS = (2, 3, 4, 5)


def values() -> dict[str, Any]:
    """One of each kind of value the fast path reads."""
    readonly = np.arange(6, dtype=np.float64)
    readonly.flags.writeable = False
    return {
        "x": np.arange(16, dtype=np.float32).reshape(2, 8),
        "fortran": np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
        "big_endian": np.arange(5, dtype=">i4"),
        "bool": np.array([True, False, True]),
        "zero_d": np.array(2.5),
        "strided": np.arange(10, dtype=np.int16)[::2],
        "transposed": np.arange(24, dtype=np.uint8).reshape(2, 3, 4).transpose(1, 0, 2),
        "readonly": readonly,
        "scalar": np.float32(1.5),
        "complex": np.arange(3, dtype=np.complex64),
    }


def main() -> None:
    here = Path(__file__).parent
    for protocol in PROTOCOLS:
        body = pickle.dumps(values(), protocol=protocol)
        (here / f"protocol{protocol}.pickle").write_bytes(body)
    print(f"numpy {np.__version__}: wrote {len(PROTOCOLS)} bodies to {here}")


if __name__ == "__main__":
    main()
