"""CPU threads for serving: one OpenMP pool, and as many of its threads as the machine can give.

torch runs a CPU op on several threads through OpenMP, and a decode step is ~100
such ops, each ending at a barrier where the threads wait for each other. Two
things make those waits expensive, and this module handles both:

- **A second pool.** Each thread that runs a parallel op keeps its own pool of
  workers. The thread that loaded the weights keeps one, the decoding thread
  has another, and GNU OpenMP, managing more threads than there are CPUs, stops
  spinning at barriers: every op pays a futex wake-up (1.5-1.6x per step at
  batch 1, `benchmarks/omp_threads.py`). `release_thread_pool` ends the calling
  thread's pool; `chatcore.weights.build_engine` calls it after every load.
- **A busy machine.** When other work holds a core (another process, or the
  bot's own event loop in a burst), a barrier waits for a descheduled thread and
  a two-thread step can take several times as long as a one-thread step
  (int8, batch 1, load 3 on 2 cores: 69 ms vs 28 ms). `ThreadTuner` lets the
  decoding thread find out, step by step, which setting is faster now.
"""

from __future__ import annotations

import ctypes
import functools
import statistics
import time
from collections import deque
from collections.abc import Callable

import torch

# torch's own default (all cores), read before any batch worker changes its setting: torch
# hands the last setting made on any thread to threads that start later
SERVING_THREADS = torch.get_num_threads()


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP worker pool; True if it did.

    ``omp_pause_resource_all`` (OpenMP 5.0) in GNU libgomp, the runtime of torch's Linux
    wheels, ends the workers of the calling thread's pool; a later parallel op on this
    thread starts a new one. Elsewhere it does nothing.
    """
    pause = _pool_pause()
    return pause is not None and pause(1) == 0  # omp_pause_soft: the threads go, the settings stay


@functools.cache  # every engine build calls release_thread_pool; the runtime does not change
def _pool_pause() -> Callable[[int], int] | None:
    """libgomp's ``omp_pause_resource_all`` if torch runs on it, else None."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        runtime = ctypes.CDLL(None)  # the symbols of what the process loaded: torch's OpenMP runtime
    except (OSError, TypeError):  # no process-wide symbol lookup (Windows)
        return None
    # GNU libgomp pauses the calling thread's pool only. LLVM's and Intel's runtimes (they export
    # __kmpc_*) pause every thread of the process, which is unsafe while the batch worker decodes.
    pause = getattr(runtime, "omp_pause_resource_all", None)
    if pause is None or hasattr(runtime, "__kmpc_fork_call"):
        return None
    return pause


class ThreadTuner:
    """Chooses, for each decode step, between all of the serving threads and one.

    It decodes on the current setting and, every so often, runs one step on the
    other: a probe, compared with the median of the last steps of the same batch
    size (a step's cost depends on the batch; neighbouring steps differ by one
    token of context). Two probes in a row that beat it by `margin` switch the
    setting; a probe that loses doubles the wait before the next one, from
    `min_interval` up to `max_interval` seconds, so probing a setting that is
    several times slower costs a fraction of a percent. Not thread-safe: the
    batch worker alone calls it.
    """

    def __init__(self, threads: int, *, min_interval: float = 1.0, max_interval: float = 30.0,
                 margin: float = 0.15, window: int = 8, clock: Callable[[], float] = time.monotonic) -> None:
        self.threads = max(1, int(threads))
        self.current = self.threads
        self.min_interval, self.max_interval, self.margin = min_interval, max_interval, margin
        self.clock = clock
        self.interval = min_interval
        self.next_probe = clock() + min_interval
        self.wins = 0
        self.switches = 0  # for /status, tests and benchmarks
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)

    @property
    def other(self) -> int:
        return 1 if self.current == self.threads else self.threads

    def choose(self, batch: int) -> int:
        """Threads for the next decode step of `batch` rows: the current setting, or a probe of the other."""
        if self.threads == 1 or self.clock() < self.next_probe or len(self._baseline(batch)) < 3:
            return self.current
        return self.other

    def observe(self, batch: int, threads: int, seconds: float) -> None:
        """Record how long a decode step of `batch` rows took on `threads` threads."""
        if threads == self.current:
            self._recent.append((batch, seconds))
            return
        baseline = self._baseline(batch)
        if len(baseline) < 3:
            return
        if seconds < statistics.median(baseline) * (1 - self.margin):
            self.wins += 1
            if self.wins >= 2:  # one fast step can be luck; two in a row are a trend
                self.current, self.wins = threads, 0
                self.switches += 1
                self._recent.clear()
                self.interval = self.min_interval
            self.next_probe = self.clock() + (0 if self.wins else self.interval)
        else:
            self.wins = 0
            self.interval = min(self.interval * 2, self.max_interval)
            self.next_probe = self.clock() + self.interval

    def _baseline(self, batch: int) -> list[float]:
        return [s for b, s in self._recent if b == batch]
