"""Background prefetching of host batches (double buffering).

A :class:`Prefetcher` runs an iterable in a daemon thread and hands its items over a queue of
``depth`` slots (2 = double buffering): while the device computes round ``t``, the host
builds (and optionally ``jax.device_put``-s) round ``t + 1``. Items come out in order; an
exception raised by the producer is re-raised in the consumer at the position it occurred;
:meth:`Prefetcher.close` (or leaving the ``with`` block) stops the thread cleanly.

Example:
    >>> def rounds():                                              # doctest: +SKIP
    ...     for t in range(num_rounds):
    ...         yield make_client_batches(tok, parts, sample(t), steps=S, batch_size=B,
    ...                                   seed=seed, round_idx=t)
    >>> with Prefetcher(rounds(), device_put=True) as batches:     # doctest: +SKIP
    ...     for t, batch in enumerate(batches):
    ...         state = round_fn(state, batch, ...)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_DONE = object()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Iterate ``source`` in a background thread, ``depth`` items ahead.

    Args:
      source: any iterable (e.g. a generator building one round's batches per item).
      depth: queue slots (2 = double buffering).
      device_put: apply ``jax.device_put(item, sharding)`` in the background thread.
      sharding: optional sharding/device for ``device_put``.
      transform: optional function applied to each item in the thread (before
        ``device_put``).
    """

    def __init__(
        self,
        source: Iterable[Any],
        *,
        depth: int = 2,
        device_put: bool = False,
        sharding: Any = None,
        transform: Callable[[Any], Any] | None = None,
    ):
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        self._source = source
        self._device_put = device_put
        self._sharding = sharding
        self._transform = transform
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="fedlora-prefetch", daemon=True)
        self._thread.start()

    def _prepare(self, item: Any) -> Any:
        if self._transform is not None:
            item = self._transform(item)
        if self._device_put:
            import jax

            item = jax.device_put(item, self._sharding)
        return item

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if self._stop.is_set() or not self._put(self._prepare(item)):
                    return
            self._put(_DONE)
        except BaseException as err:  # handed to the consumer, re-raised there
            self._put(_Raised(err))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._finished = True
                    raise StopIteration from None
        if item is _DONE:
            self._finished = True
            self._thread.join()
            raise StopIteration
        if isinstance(item, _Raised):
            self._finished = True
            self._thread.join()
            raise item.error
        return item

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the producer thread and drop queued items (idempotent)."""
        self._stop.set()
        self._finished = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the producer thread is still running."""
        return self._thread.is_alive()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
