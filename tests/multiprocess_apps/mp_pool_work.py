"""A metered function for multiprocessing pools (importable by spawned children)."""

import meterage


@meterage.meter("mp.pool.square")
def square(number: int) -> int:
    return number * number


def ten_calls() -> None:
    """Ten calls of ``mp.pool.square`` (a spawned process's job)."""
    for number in range(10):
        square(number)
