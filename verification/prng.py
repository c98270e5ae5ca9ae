"""A portable PRNG: xoshiro256** seeded by splitmix64, in pure Python integers.

Why not numpy's or Python's generators: their streams are implementation details that
may change between versions and are hard to re-implement in a testbench. These two
algorithms (Blackman & Vigna, https://prng.di.unimi.it/) are a few lines of 64-bit
integer arithmetic, so the same seed gives the same vectors on every platform and
Python version, and a SystemVerilog or C testbench can reproduce the stream.

Known answers (tests/test_verification_prng.py): splitmix64 from state 1234567 and
xoshiro256** from state (1, 2, 3, 4) give the reference outputs of the C code.
"""
from __future__ import annotations

MASK64 = (1 << 64) - 1


def splitmix64(state: int) -> tuple[int, int]:
    """One splitmix64 step: (new state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & MASK64


class Xoshiro256:
    """xoshiro256** with helpers for the draws the case generator needs."""

    def __init__(self, seed: int = 1, state: tuple[int, int, int, int] | None = None):
        if state is None:
            sm = int(seed) & MASK64
            s = []
            for _ in range(4):
                sm, out = splitmix64(sm)
                s.append(out)
            state = tuple(s)
        if not any(state):
            raise ValueError("xoshiro256** state must not be all zero")
        self.s = [int(v) & MASK64 for v in state]

    def next_u64(self) -> int:
        s = self.s
        result = (_rotl((s[1] * 5) & MASK64, 7) * 9) & MASK64
        t = (s[1] << 17) & MASK64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return result

    def u32(self) -> int:
        """The upper 32 bits (the better ones) of the next output."""
        return self.next_u64() >> 32

    def below(self, n: int) -> int:
        """Uniform integer in [0, n) by rejection (no modulo bias; n <= 2^64)."""
        if n <= 0:
            raise ValueError("below(n) needs n >= 1")
        if n == 1:
            return 0
        bits = (n - 1).bit_length()
        while True:
            v = self.next_u64() >> (64 - bits)
            if v < n:
                return v

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def u32_list(self, n: int) -> list[int]:
        return [self.u32() for _ in range(n)]
