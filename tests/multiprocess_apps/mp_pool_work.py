"""A metered function for multiprocessing pools (importable by spawned children)."""

import meterage


@meterage.meter("mp.pool.square")
def square(number: int) -> int:
    return number * number
