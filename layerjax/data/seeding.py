"""Cheap, keyed random generators: one independent stream per (seed, stream, index).

Samples are generated from their index alone (not from a running generator), so any sample can be
rebuilt on its own, processes can take disjoint indices, and a restored iterator needs no RNG
state. Philox is counter-based: distinct keys give independent streams by design. Re-keying one
generator per thread costs ~3 us where building a new seeded generator costs ~15 us, which matters
when a sample takes ~100 us in total.
"""

from __future__ import annotations

import threading

import numpy as np

STREAMS = {"train": 0, "eval": 1}  # disjoint streams: held-out samples never repeat training ones

_PER_THREAD = threading.local()  # grain may call sources from several threads


def keyed_generator(seed: int, stream: int, index: int) -> np.random.Generator:
    """A generator whose output depends only on (seed, stream, index)."""
    if not 0 <= seed < 2**32 or not 0 <= stream < 2**32 or not 0 <= index < 2**64:
        raise ValueError(
            f"need 0 <= seed < 2**32 (data.seed) and index >= 0, got seed={seed}, index={index}")
    if not hasattr(_PER_THREAD, "bit_generator"):
        _PER_THREAD.bit_generator = np.random.Philox(key=0)
        _PER_THREAD.generator = np.random.Generator(_PER_THREAD.bit_generator)
    _PER_THREAD.bit_generator.state = {
        "bit_generator": "Philox",
        "state": {"counter": np.zeros(4, np.uint64),
                  "key": np.array([(stream << 32) | seed, index], np.uint64)},
        "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0,
    }
    return _PER_THREAD.generator
