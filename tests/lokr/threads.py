"""Run a check from several threads at once, for the tests of per-row batches shared across threads."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(check: Callable[[int], None], count: int = 4) -> None:
    """`check(seed)` for seeds `0..count-1`, each in its own thread, all at once; re-raises the first failure."""
    failures: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            check(seed)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
