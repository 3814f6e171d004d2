"""pool.map(f, xs) == list(map(f, xs)) over random inputs, chunk sizes and worker counts."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procpool import Pool
from tests.helpers import square

values = st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=20), st.none())


def test_map_equals_builtin_map() -> None:
    # One pool per worker count for the whole run: hypothesis draws many examples.
    pools = {workers: Pool(workers) for workers in (1, 2, 3)}
    try:

        @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(
            xs=st.lists(st.integers(min_value=-(10**12), max_value=10**12), max_size=300),
            chunksize=st.one_of(st.none(), st.integers(min_value=1, max_value=50)),
            workers=st.sampled_from(sorted(pools)),
        )
        def check(xs: list[int], chunksize: int | None, workers: int) -> None:
            pool = pools[workers]
            assert pool.map(square, xs, chunksize) == list(map(square, xs))
            assert list(pool.imap(square, iter(xs), chunksize)) == list(map(square, xs))

        check()
    finally:
        for pool in pools.values():
            pool.terminate()


def test_unordered_results_are_a_permutation_of_any_values() -> None:
    with Pool(2) as pool:

        @settings(max_examples=30, deadline=None)
        @given(xs=st.lists(values, max_size=100), chunksize=st.integers(min_value=1, max_value=20))
        def check(xs: list[object], chunksize: int) -> None:
            got = sorted(pool.imap_unordered(repr, xs, chunksize))
            assert got == sorted(map(repr, xs))

        check()
