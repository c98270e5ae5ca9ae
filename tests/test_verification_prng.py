"""Known answers of the portable PRNG (reference outputs of Vigna's C code)."""
from verification.prng import Xoshiro256, splitmix64


def test_splitmix64_known_answers():
    s, out = 1234567, []
    for _ in range(5):
        s, o = splitmix64(s)
        out.append(o)
    assert out == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                   4593380528125082431, 16408922859458223821]


def test_xoshiro256starstar_known_answers():
    r = Xoshiro256(state=(1, 2, 3, 4))
    assert [r.next_u64() for _ in range(6)] == [11520, 0, 1509978240, 1215971899390074240,
                                                1216172134540287360, 607988272756665600]


def test_below_is_in_range_and_seeded():
    a, b = Xoshiro256(7), Xoshiro256(7)
    xs = [a.below(10) for _ in range(200)]
    assert xs == [b.below(10) for _ in range(200)]
    assert set(xs) == set(range(10))
    assert Xoshiro256(8).u32_list(4) != Xoshiro256(7).u32_list(4)
