"""The outbox's one writer thread: store calls in order, off the event loop.

SQLite blocks (and fsyncs), so every `Store` call runs here, never on the loop.
Leaner than `run_in_executor`, which costs two futures, a condition variable
and two locks per call: at sensor rates that hop was a good part of the
relay's CPU. Here a call is one queue put, and one `call_soon_threadsafe`
back with the result or the exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class Writer:
    """One daemon thread running calls in the order they were made."""

    def __init__(self, name: str = "outbox") -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`fn(*args)` on the writer thread; await the result on the loop.

        A call whose awaiting task is cancelled still runs (like a started executor job):
        its result is dropped.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._calls.put((loop, fut, fn, args))
        if self._thread.ident is None:
            self._thread.start()  # on first use: an outbox never opened has no thread
        return fut

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            loop, fut, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting task, whatever it is
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, fut, result, error)

    def shutdown(self) -> None:
        """Run what was queued, then stop the thread."""
        if self._thread.ident is not None:
            self._calls.put(None)
            self._thread.join()


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
