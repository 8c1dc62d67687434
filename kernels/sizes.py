"""The launchers' integer arithmetic on the host.

triton.cdiv and triton.next_power_of_2 are Triton's constexpr functions, made to be called inside
kernels too, and a call of one from Python costs ~3 us in Triton 3.6 (measured on a 2-core CPU,
where these take 0.01-0.04 us): a launcher making ten of them spent more host time on its grid
than on its launch checks. These are the same functions for the launchers' ints.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (1 for 1); 0 for 0, as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
