"""Large buffers travel through shared memory both ways, and no segment outlives its use."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from procpool import Pool, WorkerCrashedError
from procpool._core import _shm as shm
from tests.helpers import (
    crash_after_making_array,
    double,
    keep_array,
    kept_totals,
    make_array,
    total,
)

np = pytest.importorskip("numpy")
pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")


def _segments() -> set[str]:
    """This process's segments: those named in /dev/shm, and the anonymous ones it holds."""
    named = {n for n in os.listdir("/dev/shm") if n.startswith(f"procpool-{os.getpid()}-")}
    return named | _memfds(os.getpid())


def _memfds(pid: int) -> set[str]:
    """The descriptors of procpool's anonymous segments that process ``pid`` holds,
    but for those of its mappings (an mmap object keeps a copy of its descriptor)."""
    with open(f"/proc/{pid}/maps") as maps:
        mapped = {line.split()[4] for line in maps if "/memfd:procpool" in line}
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:procpool"):
                continue
            if str(os.stat(f"/proc/{pid}/fd/{fd}").st_ino) not in mapped:
                held.add(fd)
        except OSError:
            pass  # closed meanwhile
    return held


def _held(pid: int) -> set[str]:
    """procpool's anonymous segments that process ``pid`` holds in any way, by
    descriptor or mapped (their inodes)."""
    with open(f"/proc/{pid}/maps") as maps:
        held = {line.split()[4] for line in maps if _is_segment(line.split()[5:])}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if _is_segment(os.readlink(f"/proc/{pid}/fd/{fd}").split()):
                held.add(str(os.stat(f"/proc/{pid}/fd/{fd}").st_ino))
        except OSError:
            pass  # closed meanwhile
    return held


def _is_segment(path: list[str]) -> bool:
    return path[:1] == ["/memfd:procpool"]  # not "/memfd:procpool-slot", a worker's slot


def test_arrays_round_trip_through_shared_memory(start_method: str) -> None:
    arrays = [np.random.default_rng(i).random(200_000) for i in range(6)]  # 1.6 MB each
    with Pool(2, context=start_method) as pool:
        out = pool.map(double, arrays, chunksize=1)
        for got, want in zip(out, arrays):
            np.testing.assert_array_equal(got, want * 2)
            assert got.flags.writeable
        big = pool.apply(make_array, (1_000_000,))
        assert big[-1] == 999_999.0
        small = pool.apply(make_array, (10,))  # stays in the pipe
        assert list(small) == list(range(10))
    assert not _segments()


def test_bytearrays_too() -> None:
    data = bytearray(os.urandom(1 << 20))
    with Pool(1) as pool:
        assert pool.apply(bytes, (data,)) == bytes(data)
    assert not _segments()


def test_long_lists_of_small_items_are_not_searched_for_large_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The search for large bytes and str after pickling runs in Python, item by
    # item: a list of 100,000 ints cost 4x its pickling. A long container is
    # searched only when its pickle averages LARGE_ITEM_MEAN an item.
    searched: list[int] = []
    search = shm._large_data_inside

    def counted(obj: object, longest: int) -> bool | None:
        searched.append(longest)
        return search(obj, longest)

    monkeypatch.setattr(shm, "_large_data_inside", counted)
    recycler = shm.Recycler()
    numbers = list(range(100_000))
    for obj in (numbers, (numbers, None), [str(i) for i in numbers]):
        assert isinstance(shm.pack(obj, recycler), bytes)
    assert sys.maxsize not in searched
    large = shm.pack([os.urandom(shm.THRESHOLD) for _ in range(20)], recycler)
    assert isinstance(large, tuple) and len(large[2]) == 20
    recycler.discard(large[1])
    # The price: a lone large item among many small ones goes in band.
    lone = [b"x" * shm.THRESHOLD, *range(200)]
    assert isinstance(shm.pack(lone, recycler), bytes)
    assert pickle.loads(shm.pack(lone, recycler)) == lone


def test_large_bytes_and_text_travel_through_shared_memory_too() -> None:
    # bytes and str pickle only in band; pack() hands those of THRESHOLD or
    # more (bytes, or characters) to a segment as buffers, in the shapes
    # batches and replies take, once each however many items share one.
    big, other = os.urandom(shm.THRESHOLD), os.urandom(shm.THRESHOLD + 1)
    small = b"s" * (shm.THRESHOLD - 1)
    text = "é\ud800" + "t" * shm.THRESHOLD  # a lone surrogate: pickle keeps it
    recycler = shm.Recycler()
    shapes = {
        "items": [big, 1, small],  # map(f, items)
        "star": [(1, big), (2, other)],  # starmap, apply_async(f, args)
        "keywords": [((big,), {"k": 1})],  # apply_async(f, args, kwds)
        "reply": ([big, (big, 2)], None),  # a batch's (values, errors)
        "shared": [(big, i) for i in range(40)],  # longer than what is searched first
        "text": [(text, 1)],  # its UTF-8: two bytes for "é", three for the surrogate
    }
    sizes = {}
    for name, obj in shapes.items():
        packed = shm.pack(obj, recycler)
        assert isinstance(packed, tuple), name  # (pickle, segment, layout)
        sizes[name] = [length for _, length in packed[2]]
        recycler.discard(packed[1])
    assert sizes == {
        "items": [len(big)],
        "star": [len(big), len(other)],
        "keywords": [len(big)],
        "reply": [len(big)],
        "shared": [len(big)],
        "text": [len(text) + 1 + 2],
    }
    # What several items share stays one object, carried once (a named segment
    # here, which unpack() maps by name).
    pair = (big, 1)
    names = (f"procpool-{os.getpid()}-test-{i}" for i in range(3))
    packed = shm.pack([pair, pair, [pair]], lambda: next(names))
    assert isinstance(packed, tuple) and len(packed[2]) == 1
    items = shm.unpack(packed)
    assert items == [pair, pair, [pair]] and items[0] is items[1] is items[2][0]
    texts = (text, 1)
    names = (f"procpool-{os.getpid()}-text-{i}" for i in range(3))
    assert shm.unpack(shm.pack([texts, texts], lambda: next(names))) == [texts, texts]
    for in_band in ([small] * 3, [_Bytes(big)], [[[[big]]]], ["t" * (shm.THRESHOLD - 1)]):
        assert isinstance(shm.pack(in_band, recycler), bytes)
        assert pickle.loads(shm.pack(in_band, None)) == in_band

    with Pool(2) as pool:
        assert pool.apply(_same, (big,)) == big
        assert pool.map(len, [big, other, small] * 3) == [len(big), len(other), len(small)] * 3
        assert pool.starmap(_joined, [(big, other)] * 3) == [big + other] * 3
        shared = [(big, i) for i in range(40)]
        assert pool.map(_same, shared, chunksize=40) == shared
        assert pool.apply(_same, (text,)) == text
        assert pool.map(len, [text, "x" * (4 << 20)]) == [len(text), 4 << 20]
    assert not _segments()


class _Bytes(bytes):
    pass


def _joined(a: bytes, b: bytes) -> bytes:
    return a + b


def test_no_segment_leaks_when_a_worker_dies_holding_one() -> None:
    with Pool(1) as pool:
        with pytest.raises(WorkerCrashedError):
            pool.apply(crash_after_making_array, (1_000_000,))
        # The argument side too: the worker dies while its arguments are mapped.
        with pytest.raises(WorkerCrashedError):
            pool.apply(os._exit, (3,))
        arr = np.ones(1_000_000)
        with pytest.raises(WorkerCrashedError):
            pool.apply(_exit_with_array, (arr,))
        assert pool.apply(double, (arr,)).sum() == 2_000_000
    assert not _segments()


def _exit_with_array(a: object) -> None:
    os._exit(4)


@pytest.mark.skipif(sys.platform != "linux", reason="/dev/shm")
def test_terminate_with_segments_in_flight_leaves_none() -> None:
    arrays = [np.ones(500_000) for _ in range(8)]
    pool = Pool(2)
    result = pool.map_async(double, arrays, chunksize=1)
    pool.terminate()
    pool.join()
    del result
    assert not _segments()


def test_cancelled_futures_release_their_segments() -> None:
    from procpool import ProcessPoolExecutor
    from procpool.testing import sleep

    with ProcessPoolExecutor(1) as ex:
        ex.submit(sleep, 0.3)
        futures = [ex.submit(double, np.ones(500_000)) for _ in range(5)]
        ex.shutdown(wait=True, cancel_futures=True)
    assert any(f.cancelled() for f in futures)
    assert not _segments()


def test_default_map_chunks_carry_about_a_megabyte() -> None:
    # Big items go one or a few per chunk, so they spread over the workers and
    # their transfers overlap with work; small ones keep the usual chunks.
    import threading

    from procpool._runner import map_chunksize

    assert map_chunksize(1000, 2) == map_chunksize(1000, 2, sample=3) == 125
    assert map_chunksize(1000, 2, sample=np.zeros(1 << 20)) == 1  # 8 MB
    assert map_chunksize(1000, 2, sample=np.zeros(1 << 14)) == 7  # 128 KiB and a header
    assert map_chunksize(1000, 2, sample=threading.Lock()) == 125  # fails later, by name
    with Pool(2) as pool:
        arrays = [np.full(1 << 18, float(i)) for i in range(8)]  # 2 MB each
        out = pool.map(double, arrays)
        assert [float(a[0]) for a in out] == [2.0 * i for i in range(8)]
        assert pool.statistics().tasks_completed == 8


def test_adaptive_chunks_carry_about_a_megabyte_too() -> None:
    # imap and Executor.map size chunks by the work they measure; big items
    # would then go several to a batch (four 8 MB arrays summed in ~5 ms),
    # waiting for each other. Their chunks stop at about a megabyte, as map's.
    from procpool import ProcessPoolExecutor
    from procpool._results import IMapIterator

    arrays = [np.full(1 << 18, float(i)) for i in range(24)]  # 2 MB each
    with Pool(2) as pool:
        it = pool.imap(total, arrays)
        assert list(it) == [float(i << 18) for i in range(24)]
        assert isinstance(it, IMapIterator)
        assert it._chunksize == 1
        tiny = pool.imap(abs, range(50_000))
        assert sum(tiny) == sum(range(50_000))
        assert isinstance(tiny, IMapIterator)
        assert tiny._chunksize > 100  # small items: chunks grow as before
    with ProcessPoolExecutor(2) as ex:
        assert list(ex.map(total, arrays)) == [float(i << 18) for i in range(24)]


def test_several_buffers_share_one_segment_each_in_its_place() -> None:
    # Sizes that are not multiples of the 64-byte alignment, so each buffer's
    # offset in the segment differs from the running sum of the sizes.
    # Three rounds: the first writes fresh segments, the others write them again
    # through their kept mappings (one buffer read-only: through pwrite).
    with Pool(1) as pool:
        for i in range(3):
            arrays = (
                np.arange(40_001, dtype="float64") + i,
                np.frombuffer(bytearray(os.urandom(300_007)), dtype="uint8"),
                np.frombuffer(os.urandom(270_001), dtype="uint8"),  # read-only
                bytearray(os.urandom(262_147)),
            )
            got = pool.apply(_same, (arrays,))
            for g, a in zip(got[:3], arrays[:3]):
                np.testing.assert_array_equal(g, a)
            assert got[3] == arrays[3]
            del got
    assert not _segments()


def _same(x: object) -> object:
    return x


def test_a_maps_later_batches_do_not_try_the_direct_path() -> None:
    # Large items make one batch per submit; only a call's first batch may be
    # sent from the caller's thread, the others must not wait for the engine lock.
    with Pool(2) as pool:
        engine = pool._runner.engine  # type: ignore[attr-defined]
        tried: list[int] = []
        real = engine._send_direct_locked

        def spy(batch: object, attach: object) -> bool:
            tried.append(batch.first_index)  # type: ignore[attr-defined]
            return bool(real(batch, attach))

        engine._send_direct_locked = spy
        arrays = [np.full(1 << 18, float(i)) for i in range(8)]  # 2 MB: one per chunk
        out = pool.map(double, arrays)
        assert [float(a[0]) for a in out] == [2.0 * i for i in range(8)]
    assert tried in ([], [0])


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and /dev/shm")
def test_arrays_and_bytes_travel_through_the_pipe_when_no_segment_can_be_written() -> None:
    # A file size limit of 1 MB makes every 2 MB segment write fail (EFBIG), as
    # a full /dev/shm would (ENOSPC): both directions fall back to the pipe.
    script = textwrap.dedent(
        """
        import os, resource, signal
        import numpy as np
        import procpool
        from tests.helpers import double

        if __name__ == "__main__":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the write kills us
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
            arrays = [np.full(1 << 18, float(i)) for i in range(4)]  # 2 MB each
            with procpool.Pool(2) as pool:
                out = pool.map(double, arrays, chunksize=1)
                blobs = [bytes([i]) * (2 << 20) for i in range(4)]  # large bytes too
                assert pool.map(bytes, blobs, chunksize=1) == blobs
                texts = [chr(0x41 + i) * (2 << 20) for i in range(4)]  # and text
                assert pool.map(str, texts, chunksize=1) == texts
            assert [float(a[-1]) for a in out] == [0.0, 2.0, 4.0, 6.0]
            left = [n for n in os.listdir("/dev/shm") if n.startswith(f"procpool-{os.getpid()}-")]
            print("ok", left)
        """
    )
    out = _run_script(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "[]"]


def test_argument_segments_are_written_again_once_the_worker_let_go() -> None:
    recycler = shm.process_recycler()
    assert recycler is not None
    arrays = [np.full(200_000, float(i)) for i in range(6)]  # 1.6 MB each
    with Pool(1) as pool:
        made = recycler.made
        # One call at a time: each batch's segment is given back before the
        # next is packed, so all six are written into the first one.
        assert [pool.apply(total, (a,)) for a in arrays] == [200_000.0 * i for i in range(6)]
        assert recycler.made - made == 1
        # Batches in flight at once each have their own; every value is right.
        for got, a in zip(pool.map(double, arrays * 4, chunksize=1), arrays * 4):
            np.testing.assert_array_equal(got, a * 2)
    assert not _segments()


def test_an_argument_a_task_keeps_is_never_written_over() -> None:
    # The worker cannot let go of a segment while a task's argument still
    # lives on it: the parent must then never write that segment again.
    recycler = shm.process_recycler()
    assert recycler is not None
    with Pool(1) as pool:
        made = recycler.made
        sums = [pool.apply(keep_array, (np.full(200_000, float(i)),)) for i in range(5)]
        for i in range(5):  # arguments the worker lets go of, written where they may
            assert pool.apply(total, (np.full(200_000, 100.0 + i),)) == 200_000 * (100.0 + i)
        assert pool.apply(kept_totals) == sums == [200_000.0 * i for i in range(5)]
        assert recycler.made - made >= 5  # one fresh segment per kept argument at least
    assert not _segments()


def test_an_idle_pool_keeps_no_segment() -> None:
    # Kept segments are memory: only while they are used.
    with Pool(1) as pool:
        assert pool.apply(total, (np.ones(200_000),)) == 200_000.0
        worker = pool.apply(os.getpid)
        assert pool.apply(make_array, (200_000,))[-1] == 199_999.0
        assert len(_segments()) == 1  # the argument's, kept to write again
        assert pool.apply(len, ([],)) == 0  # the result's, given back: kept too
        assert len(_memfds(worker)) == 1
        # Each side also keeps its mapping of what it received (shm.Mappings).
        assert len(_held(os.getpid())) == len(_held(worker)) == 2
        deadline = time.monotonic() + 10 * shm.KEEP_IDLE_S
        while (_held(os.getpid()) or _held(worker)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _held(os.getpid())  # closed while the pool is still open
        assert not _held(worker)
        assert pool.apply(total, (np.ones(200_000),)) == 200_000.0


def test_result_segments_are_written_again_once_the_caller_dropped_the_results() -> None:
    with Pool(1) as pool:
        worker = pool.apply(os.getpid)
        for i in range(5):
            result = pool.apply(make_array, (200_000 + i,))  # 1.6 MB
            assert result[-1] == 199_999.0 + i
            del result  # nothing maps its segment here now: the worker may write it again
        assert len(_held(worker)) == 1  # all five went into one
        kept = [pool.apply(make_array, (200_000 + i,)) for i in range(4)]
        assert len(_held(worker)) == 4  # mapped here: one each
        again = pool.apply(make_array, (300_000,))  # written while the others are kept
        assert [a[-1] for a in kept] == [199_999.0 + i for i in range(4)]
        assert again[-1] == 299_999.0
    assert [a[-1] for a in kept] == [199_999.0 + i for i in range(4)]  # still mapped
    assert not _segments()


def test_a_segment_received_again_is_mapped_once() -> None:
    # Mapping 8 MB and unmapping it cost about as much as writing it: a
    # receiver keeps its mapping of a segment that comes back (shm.Mappings).
    with Pool(1) as pool:
        worker = pool.apply(os.getpid)
        for i in range(5):
            result = pool.apply(double, (np.full(200_000, float(i)),))
            assert result[0] == 2.0 * i  # written again into one segment: not stale
            if i == 1:  # the result's mapping, and the argument's once written again
                first = _mapped(os.getpid())
                assert len(first) == 2
            if i > 1:
                assert _mapped(os.getpid()) == first  # the same mappings, not new ones
            del result
        mappings = shm.current_mappings()
        assert mappings is not None and mappings.kept() == 1
        # The worker, too: its mapping of the argument segment it was sent five
        # times, and of its result segment, written again through it.
        assert len(_mapped(worker)) == 2


def test_a_child_forked_while_segments_are_kept_does_not_keep_them() -> None:
    with Pool(1) as pool:
        held = pool.apply(double, (np.ones(200_000),))
        result = pool.apply(double, (np.ones(200_000),))
        del result  # its mapping is kept, unused
        assert len(_held(os.getpid())) == 3  # the two mappings, and the argument's segment
        pid = os.fork()
        if pid == 0:  # only the mapping that ``held`` uses
            os._exit(len(_held(os.getpid())))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 1
        assert held[0] == 2.0


def test_kept_mappings_over_their_bound_close_those_unused_first() -> None:
    mappings = shm.Mappings(max_bytes=1 << 30)
    mappings.MAX_KEPT = 2
    fds = [os.memfd_create("procpool", os.MFD_CLOEXEC) for _ in range(4)]
    try:
        for i, fd in enumerate(fds):
            os.ftruncate(fd, 1 << 20)
            os.pwrite(fd, bytes([i + 1]) * 16, 0)
        held = [mappings.lend(fds[0], 16), mappings.lend(fds[1], 16)]
        mappings.lend(fds[2], 16)  # dropped at once: unused
        assert mappings.kept() == 3  # over the bound, but the other two are in use
        latest = mappings.lend(fds[3], 16)
        # The unused one went; those in use stay (a map's results, held until it returns).
        assert mappings.kept() == 3
        assert [bytes(x[:2]) for x in (*held, latest)] == [b"\x01\x01", b"\x02\x02", b"\x04\x04"]
        del held, latest
        mappings.lend(fds[0], 16)
        assert mappings.kept() == 2  # within the bound again, the oldest unused closed
    finally:
        mappings.clear()
        for fd in fds:
            os.close(fd)


def test_without_ctypes_each_message_maps_its_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Python built without ctypes: no kept mappings, no copies by address;
    # segments are still written again, through pwrite, and mapped per message.
    monkeypatch.setattr(shm, "_CTYPES", False)  # before the pool's processes fork
    arrays = [np.full(200_000, float(i)) for i in range(4)]
    with Pool(1) as pool:
        kept = [pool.apply(double, (a,)) for a in arrays]  # each result held: its own segment
        for _ in range(2):
            for got, a in zip(pool.map(double, arrays, chunksize=1), arrays):
                np.testing.assert_array_equal(got, a * 2)
        assert [k[0] for k in kept] == [2.0 * i for i in range(4)]
        assert shm.received_mappings().kept() == 0


def test_read_only_arrays_are_written_again_too() -> None:
    # A read-only buffer cannot be copied by address (ctypes); it is written
    # with pwrite into the kept segment instead.
    arrays = [np.full(200_000, float(i)) for i in range(4)]
    for a in arrays:
        a.flags.writeable = False
    with Pool(1) as pool:
        assert [pool.apply(total, (a,)) for a in arrays] == [200_000.0 * i for i in range(4)]
        for got, a in zip(pool.map(double, arrays * 2, chunksize=1), arrays * 2):
            np.testing.assert_array_equal(got, a * 2)


def _mapped(pid: int) -> list[str]:
    """Where in process ``pid`` procpool's anonymous segments are mapped (address ranges)."""
    with open(f"/proc/{pid}/maps") as maps:
        return sorted(line.split()[0] for line in maps if _is_segment(line.split()[5:]))


def test_segments_go_by_name_where_anonymous_ones_cannot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without memfd_create (or descriptor passing): named files in /dev/shm, each
    # unlinked by its receiver as it maps it, never written again.
    monkeypatch.setattr(shm, "_MEMFD", False)  # before the pool's processes fork
    arrays = [np.full(200_000, float(i)) for i in range(4)]
    with Pool(2, context="fork") as pool:
        for got, a in zip(pool.map(double, arrays, chunksize=1), arrays):
            np.testing.assert_array_equal(got, a * 2)
        assert pool.apply(total, (arrays[1],)) == 200_000.0
        assert not _segments()
    assert not _segments()


def test_a_recycler_keeps_only_segments_that_fit_and_few_of_them() -> None:
    recycler = shm.Recycler()
    small = [memoryview(bytearray(300_000))]
    ids = [recycler.write(small, [(0, 300_000)]) for _ in range(shm.Recycler.MAX_KEPT + 2)]
    assert len(_memfds(os.getpid())) == len(ids)
    for segment in ids:
        recycler.give_back(segment)
    assert recycler.kept() == shm.Recycler.MAX_KEPT  # the others were closed
    assert len(_memfds(os.getpid())) == shm.Recycler.MAX_KEPT
    made = recycler.made
    again = recycler.write(small, [(0, 300_000)])
    assert again in ids  # written again
    big = recycler.write([memoryview(bytearray(700_000))], [(0, 700_000)])
    assert big not in ids  # none kept was large enough
    assert recycler.made == made + 1
    recycler.discard(again)  # still mapped somewhere: never written again
    recycler.give_back(again)  # a late word about it changes nothing
    recycler.clear()  # the kept ones
    assert len(_memfds(os.getpid())) == 1  # lent: its receiver gives it back, or not
    recycler.discard(big)
    assert not _memfds(os.getpid())


@pytest.mark.skipif(sys.platform != "linux", reason="/dev/shm")
def test_a_killed_parent_leaves_no_segment_behind() -> None:
    # Segments outlive their batches, kept to write again: nothing of them may
    # outlive a pool's process killed with SIGKILL.
    script = textwrap.dedent(
        """
        import os, signal
        import numpy as np
        import procpool
        from tests.helpers import make_array, total, pid

        if __name__ == "__main__":
            pool = procpool.Pool(2)
            arrays = [np.ones(200_000) for _ in range(8)]
            assert pool.map(total, arrays, chunksize=1) == [200_000.0] * 8
            assert [a[-1] for a in pool.map(make_array, [200_000] * 8)] == [199_999.0] * 8
            print(os.getpid(), *sorted(set(pool.map(pid, range(50), chunksize=1))), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    parent, *workers = (int(p) for p in _run_script(script).stdout.split())
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"procpool-{parent}-")]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_NOFILE and memfd")
def test_a_result_whose_descriptor_cannot_be_received_fails_alone() -> None:
    # Before 3.13 each result held here keeps a descriptor (mmap's copy): with
    # none left, the kernel drops a segment's descriptor on arrival. Those tasks
    # fail, naming why; the pool's conversation with the worker goes on.
    script = textwrap.dedent(
        """
        import os, resource
        import procpool
        from tests.helpers import make_array

        if __name__ == "__main__":
            with procpool.Pool(1) as pool:
                assert pool.apply(abs, (-1,)) == 1
                assert pool.apply(make_array, (200_000,))[-1] == 199_999.0
                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                held = len(os.listdir("/proc/self/fd"))
                resource.setrlimit(resource.RLIMIT_NOFILE, (held + 3, hard))
                kept, failed = [], []
                for _ in range(12):
                    try:
                        kept.append(pool.apply(make_array, (200_000,)))
                    except procpool.SerializationError as exc:
                        failed.append("Too many open files" in str(exc)
                                      or "no descriptor left" in str(exc))
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                assert all(a[-1] == 199_999.0 for a in kept)
                print(len(kept) + len(failed), all(failed), pool.apply(abs, (-5,)))
        """
    )
    out = _run_script(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["12", "True", "5"]


def _run_script(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter, from the repository's root."""
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
