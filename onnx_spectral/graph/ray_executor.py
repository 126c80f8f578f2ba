"""Passes on a Ray cluster (the `ray` extra): one actor per worker, each with its own ONNX Runtime
sessions and cache; the driver sends the batches and adds what the workers return.

Batch i of a pass goes to worker i mod N, so a worker sees the same batches in every pass over
the same data (its cache of activations stays valid). Batches given as a list or tuple (the
batches kept for the correction passes, the held-out batches) are put in Ray's object store
once and sent by reference in every later pass; a stream (calibration) is sent batch by batch,
with a bounded number in flight.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

from onnx_spectral.errors import OptionsError
from onnx_spectral.graph.executor import (
    Batch,
    Executor,
    Feeds,
    PassTask,
    R,
    WorkerCache,
    batch_samples,
)
from onnx_spectral.graph.sessions import Provider, set_session_threads

#: Batches in flight per worker before the driver waits for one to finish.
IN_FLIGHT_PER_WORKER = 2


class PassWorker:
    """A Ray actor's state: the accumulators of the passes under way and the cache."""

    def __init__(self, threads: int) -> None:
        set_session_threads(threads)
        self.cache = WorkerCache()
        self.open: dict[int, Any] = {}

    def begin(self, key: int, task: PassTask[Any]) -> None:
        self.open[key] = task.start(self.cache)

    def add(self, key: int, index: int, offset: int, feeds: Feeds) -> None:
        self.open[key].add(Batch(index, offset, feeds))

    def finish(self, key: int) -> Any:
        return self.open.pop(key).result()

    def forget(self, namespace: str) -> None:
        self.cache.forget(namespace)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise OptionsError("--ray needs the 'ray' extra: pip install 'onnx-spectral[ray]'"
                           ) from None
    return ray


class RayExecutor(Executor):
    """Passes on `workers` Ray actors (default: one per CPU of the cluster).

    `address`: an existing cluster's address ("auto" finds the one this machine belongs to,
    "ray://host:10001" a remote one), or "local" to start a Ray instance in this process. Each
    actor takes `threads` CPUs (ONNX Runtime's intra-op threads) and, where the cluster has GPUs
    and `provider` is not "cpu", one GPU.
    """

    def __init__(self, address: str = "local", workers: int | None = None, threads: int = 1,
                 provider: Provider = "auto", progress: bool = False) -> None:
        super().__init__(progress)
        ray = self.ray = _ray()
        if not ray.is_initialized():
            try:
                if address == "local":
                    ray.init(num_cpus=workers * threads if workers else None,
                             include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=address, log_to_driver=False)
            except ConnectionError as exc:
                raise OptionsError(f"--ray {address}: no Ray cluster answers there ({exc}); "
                                   "give the address that 'ray start --head' printed, or "
                                   "'local' to start one in this process") from exc
        resources = ray.cluster_resources()
        cpus = int(resources.get("CPU", 0))
        count = workers or max(cpus // threads, 1)
        if count * threads > cpus:
            raise OptionsError(f"--ray-workers {count}: {count * threads} CPUs wanted, the Ray "
                               f"cluster has {cpus}; give at most {cpus // threads} workers")
        gpus = 1 if provider != "cpu" and resources.get("GPU", 0) >= count else 0
        actor = ray.remote(num_cpus=threads, num_gpus=gpus)(PassWorker)
        self.workers = [actor.remote(threads) for _ in range(count)]
        self._held: dict[int, tuple[Sequence[Feeds], list[Any]]] = {}
        self._keys = itertools.count()

    def fold(self, task: PassTask[R], batches: Iterable[Feeds], *, desc: str | None = None,
             total: int | None = None) -> R:
        ray = self.ray
        key = next(self._keys)
        task_ref = ray.put(task)
        self._get([worker.begin.remote(key, task_ref) for worker in self.workers])
        pending: list[Any] = []
        offset = 0
        limit = IN_FLIGHT_PER_WORKER * len(self.workers)
        with self._bar(desc, total) as bar:
            for index, (feeds, sent) in enumerate(self._sendable(batches)):
                worker = self.workers[index % len(self.workers)]
                pending.append(worker.add.remote(key, index, offset, sent))
                offset += batch_samples(feeds)
                if len(pending) >= limit:
                    done, pending = ray.wait(pending, num_returns=1)
                    self._get(done)
                    bar.n = offset  # approximate: batches sent, at most `limit` ahead
                    bar.refresh()
            self._get(pending)
            bar.n = offset
            bar.refresh()
        results = self._get([worker.finish.remote(key) for worker in self.workers])
        merged = results[0]
        for result in results[1:]:
            merged = task.merge(merged, result)
        return merged

    def _sendable(self, batches: Iterable[Feeds]) -> Iterable[tuple[Feeds, Any]]:
        """(batch, what to send for it): an object-store reference for batches held in a list or
        tuple (put once, reused by later passes over the same list), the batch itself otherwise."""
        if not isinstance(batches, (list, tuple)):
            return ((feeds, feeds) for feeds in batches)
        held = self._held.get(id(batches))
        if held is None or held[0] is not batches:
            held = (batches, [self.ray.put(feeds) for feeds in batches])
            self._held[id(batches)] = held
        return zip(batches, held[1], strict=True)

    def forget(self, namespace: str) -> None:
        self._get([worker.forget.remote(namespace) for worker in self.workers])

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
        self.workers = []
        self._held.clear()

    def _get(self, refs: list[Any]) -> list[Any]:
        """`ray.get`, raising a worker's own error (a DataError, say) rather than Ray's wrapper."""
        try:
            return list(self.ray.get(refs))
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, BaseException):
                raise cause from None
            raise
