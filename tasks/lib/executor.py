"""Run a function over many work items (shards) on all cores, or on a Ray cluster.

    with Executor("local", workers=0) as ex:          # 0: one worker per core
        results = ex.map(count_words, shard_paths)   # results in the order of the items

    with Executor("ray", workers=0, address="ray://head:10001") as ex:   # the same functions on Ray
        results = ex.map(count_words, shard_paths)

The data stages are written as a map over shards of a plain, top-level function (picklable),
each call reading one input shard and writing its own output files, returning a small
result (counts, arrays); the stage combines the results in item order. So the outputs do
not depend on the executor or on how many workers there are: `local` with 1 or N processes
and `ray` give byte-identical outputs (tested). With `workers: 1` everything runs in the
calling process, which is the easiest to debug.

On Ray, the workers import this project's `tasks` package (shipped with the job through
`runtime_env.py_modules`) and must see the data paths: a shared filesystem on a real cluster
(see the README). `ray.address` is what `ray.init` takes: `auto` for a cluster this machine
belongs to, `ray://host:10001` for a remote one, none to start a local instance.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tasks.lib.process import die_with_parent
from tasks.lib.storage import progress

log = logging.getLogger("executor")
PACKAGE = Path(__file__).resolve().parents[1]  # the `tasks` package


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")


def one_thread() -> None:
    """Keep this process to one thread of math libraries: a worker is one core's share, and
    BLAS threads in every worker (langid's dot products) oversubscribe the machine, so that
    two workers ran slower than one. threadpoolctl limits the libraries already loaded (the
    process imported numpy before this runs); the variables cover those loaded later."""
    from threadpoolctl import threadpool_limits

    for var in _ONE_THREAD:
        os.environ[var] = "1"
    threadpool_limits(limits=1)
    import pyarrow

    pyarrow.set_cpu_count(1)


def orphan_guard() -> None:
    """The initializer of a spawned worker: SIGTERM when its parent dies, and exit now if the
    parent already died while this worker was still starting (PR_SET_PDEATHSIG does not fire
    for a death before it was set, and the worker would then wait on its task queue forever:
    it holds the queue's write end itself)."""
    import multiprocessing

    die_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


def _worker_init() -> None:
    import signal

    orphan_guard()
    # the worker started with SIGINT blocked (see Executor._submit): a Ctrl-C that came while it
    # was importing is pending; it is the stage's to handle, so ignore it, then unblock
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    one_thread()


def _in_dir(cwd: str, fn: Callable[..., Any], item: Any) -> Any:
    """Run fn(item) in the project folder (a Ray worker starts in a folder of its own)."""
    os.chdir(cwd)
    return fn(item)


class Executor:
    def __init__(self, kind: str = "local", workers: int = 0, address: str | None = None, desc: str = "map"):
        if kind not in ("local", "ray"):
            raise ValueError(f"unknown executor {kind!r} (local or ray)")
        self.kind, self.address, self.desc = kind, address, desc
        self.workers = workers if workers > 0 else cores()
        self._pool = None

    def __enter__(self) -> "Executor":
        if self.kind == "ray":
            import ray

            if not ray.is_initialized():
                ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
                         runtime_env={"py_modules": [str(PACKAGE)], "env_vars": {v: "1" for v in _ONE_THREAD}},
                         num_cpus=None if self.address else self.workers)
        elif self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: a forked copy of a process with threads (pyarrow, tokenizers) can deadlock
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._pool is not None:
            if exc_type is not None and not issubclass(exc_type, Exception):  # Ctrl-C, SIGTERM: stop the workers now
                for proc in list((self._pool._processes or {}).values()):
                    proc.terminate()
                self._pool.shutdown(wait=False, cancel_futures=True)
            else:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, fn: Callable[..., Any], items: Iterable[Any], unit: str = "shard") -> list[Any]:
        """fn(item) for every item, results in item order, with a progress line."""
        items = list(items)
        bar = progress(total=len(items), desc=self.desc, unit=unit)
        try:
            if self.kind == "ray":
                return self._map_ray(fn, items, bar)
            if self._pool is None:  # one worker: in this process, on one core as the pool's workers are
                from threadpoolctl import threadpool_limits

                out = []
                with threadpool_limits(limits=1):
                    for it in items:
                        out.append(fn(it))
                        bar.update(1)
                return out
            futures = self._submit(fn, items)
            out = []
            for f in futures:  # in order: the stage combines results deterministically
                out.append(f.result())
                bar.update(1)
            return out
        finally:
            bar.close()

    def _submit(self, fn, items) -> list:
        """Submit every item. The workers start at the first submission with SIGINT blocked (a
        signal mask survives exec): Ctrl-C in the terminal reaches the whole process group, and
        a worker still importing would print a KeyboardInterrupt traceback of its own, so there
        it stays pending until the worker's initializer ignores it. In this process it is only
        held back until the submission is done, then raised: ignoring it here instead lost a
        Ctrl-C that came while the workers started (found by the Ctrl-C test)."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return [self._pool.submit(fn, it) for it in items]
        # any thread may take the signal: a recording handler keeps it from interrupting a
        # worker's start half-way (the worker would die reading its start-up data); blocked in
        # this thread, the workers started from it inherit the block
        caught: list[int] = []
        old_handler = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            futures = [self._pool.submit(fn, it) for it in items]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            signal.signal(signal.SIGINT, old_handler)
        if caught:
            raise KeyboardInterrupt
        return futures

    def _map_ray(self, fn, items, bar) -> list[Any]:
        import ray

        remote = ray.remote(num_cpus=1)(_in_dir)
        cwd = os.getcwd()  # the stages use paths relative to the project: the same folder on every node
        refs = [remote.remote(cwd, fn, it) for it in items]
        pending, done = list(refs), 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done += len(ready)
            bar.update(len(ready))
        return ray.get(refs)
