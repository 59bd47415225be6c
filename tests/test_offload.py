"""vcfs/offload.py, the thread lane every blocking call of the FUSE adapter goes through.

Real threads and a real trio loop: the lane must run work off the loop, hand back values and
exceptions, bound how much runs at once, and never abandon a call it started.
"""

from __future__ import annotations

import threading
import time

import pytest
import trio

from vcfs.offload import Lane


def test_runs_in_a_worker_thread_and_returns_the_value() -> None:
    async def main() -> None:
        lane = Lane(2)
        assert await lane.run(threading.get_ident) != threading.get_ident()
        assert await lane.run(lambda a, b: a + b, 2, 3) == 5

    trio.run(main)


def test_an_exception_in_the_worker_reaches_the_caller() -> None:
    def fail() -> None:
        raise PermissionError(13, "no")

    async def main() -> None:
        with pytest.raises(PermissionError):
            await Lane(1).run(fail)

    trio.run(main)


def test_at_most_slots_calls_run_at_once() -> None:
    lock = threading.Lock()
    running = [0, 0]  # now, most seen

    def work() -> None:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    async def main() -> None:
        lane = Lane(2)
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(lane.run, work)
        assert lane.busy == 0

    trio.run(main)
    assert running[1] == 2


def test_a_cancelled_caller_waits_for_its_call_and_is_cancelled_after() -> None:
    """A write half done in a thread must not be abandoned: the caller gets the outcome first,
    then the cancellation at its next checkpoint."""
    done = threading.Event()
    seen: list[str] = []

    def slow() -> str:
        time.sleep(0.2)
        done.set()
        return "finished"

    async def main() -> None:
        with trio.move_on_after(0.02) as scope:
            seen.append(await Lane(1).run(slow))
            await trio.sleep(0)  # the pending cancellation lands here
            seen.append("not reached")
        assert scope.cancelled_caught

    trio.run(main)
    assert done.is_set() and seen == ["finished"]
