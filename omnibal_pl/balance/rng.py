"""SplitMix64 in pure Python: the same stream as ``csrc/rng.h``, so the Python ISF reference and
the C++ core shuffle identically for the same seed."""
from __future__ import annotations

from typing import MutableSequence

_MASK = (1 << 64) - 1


class SplitMix64:
    """64-bit SplitMix generator; ``seed`` is taken modulo 2**64."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """Integer in [0, n) by multiply-high, as in C++."""
        return (self.next() * n) >> 64

    def shuffle(self, items: MutableSequence) -> None:
        """In-place Fisher-Yates from the back, the order ``csrc/rng.h`` uses."""
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]
