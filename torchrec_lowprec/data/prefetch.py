"""Running an iterator ahead of its consumer (batches ready before the model asks): on a
background thread (:func:`prefetch`) or in a forked process (:func:`prefetch_process`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[T], depth: int = 4) -> Iterator[T]:
    """Yield ``items`` in order while a daemon thread produces up to ``depth`` of them ahead.

    An exception in the producer is re-raised in the consumer at the point it occurred; closing
    the generator early (``break``, garbage collection) stops the producer and joins it. The
    producer's work overlaps the consumer's wherever it releases the GIL (file reads, pyarrow
    parsing, numpy, torch).

    Example::

        for batch in prefetch(dataset.batches("train", 4096), depth=4):
            train_step(batch)
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(items)
        try:
            for item in it:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            put(_Raised(e))
        finally:
            close = getattr(it, "close", None)
            if close is not None and stop.is_set():
                try:
                    close()
                except Exception:  # the consumer already stopped; nothing to report to
                    pass

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def can_fork() -> bool:
    """Whether :func:`prefetch_process` can run here (POSIX ``fork``)."""
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def prefetch_process(
    produce: Callable[[], Iterable[T]],
    depth: int = 4,
    finish: Callable[[], Any] | None = None,
    apply_finish: Callable[[Any], None] | None = None,
) -> Iterator[T]:
    """Yield the items of ``produce()``, made up to ``depth`` ahead in a forked child process.

    :func:`prefetch`'s thread shares the GIL with the training loop: on a 2-core machine the
    loop then waits for the parser's Python between its ops (``docs/benchmarks.md``,
    file_loading). A child process has its own interpreter, so parsing runs on a free core at
    full speed. Items travel pickled through a pipe (numpy arrays: one copy), so ``produce``
    should yield plain numpy/Python data, not tensors.

    The child is forked, so it sees the parent's objects as they are when the iteration
    starts, and changes it makes stay in the child: ``finish()`` runs in the child after the
    last item and its result is given to ``apply_finish`` in the parent (e.g. counters the
    producer kept). Warnings raised in the child are re-issued in the parent; an exception is
    re-raised in the parent (a ``RuntimeError`` saying so if it cannot be pickled, or if the
    child dies). Closing the generator early stops the child. Example::

        for block in prefetch_process(lambda: dataset.blocks("train"), depth=4):
            train_step(to_batch(block))
    """
    import multiprocessing
    import os
    import pickle
    import warnings

    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    slots = ctx.BoundedSemaphore(depth)

    def send(kind: str, payload, caught) -> None:
        ws = [(str(w.message), w.category, w.filename, w.lineno) for w in caught]
        caught.clear()
        try:
            data = pickle.dumps((kind, payload, ws), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001 - an unpicklable item or error: say what it was
            data = pickle.dumps(
                ("error", RuntimeError(f"data loader process: cannot send {payload!r}: {e}"), ws)
            )
        writer.send_bytes(data)

    def child() -> None:
        code = 0
        try:
            reader.close()
            with warnings.catch_warnings(record=True) as caught:
                try:
                    for item in produce():
                        slots.acquire()
                        send("item", item, caught)
                    send("done", finish() if finish is not None else None, caught)
                except BaseException as e:  # handed to the parent, raised there
                    send("error", e, caught)
        except BaseException:  # the parent is gone (broken pipe): nothing to report to
            code = 1
        finally:
            os._exit(code)  # no atexit handlers or destructors of the parent's objects

    proc = ctx.Process(target=child, name="data-loader", daemon=True)
    proc.start()
    writer.close()
    try:
        while True:
            try:
                while not reader.poll(0.2):
                    if not proc.is_alive() and not reader.poll(0):
                        raise EOFError
                data = reader.recv_bytes()
            except EOFError:  # the child ended without saying why (killed, out of memory)
                proc.join(1)
                raise RuntimeError(
                    f"the data loader process died (exit code {proc.exitcode}) before the end of the data; "
                    "rerun with --prefetch-mode thread to see the error in this process"
                ) from None
            kind, payload, ws = pickle.loads(data)
            for message, category, filename, lineno in ws:
                warnings.warn_explicit(message, category, filename, lineno)
            if kind == "item":
                slots.release()
                yield payload
            elif kind == "done":
                if apply_finish is not None:
                    apply_finish(payload)
                return
            else:
                raise payload
    finally:
        reader.close()
        if proc.is_alive():
            proc.terminate()
        proc.join()
