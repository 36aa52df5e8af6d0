"""The background loop: one daemon thread running one event loop, where every Machines API call
of the process runs, and a way for another event loop to wait on its work without blocking."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """A daemon thread running one event loop; every Machines API call of the process runs here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="flyfn-pool", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 5.0) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


async def wait_done(future: concurrent.futures.Future[Any], max_wait: float) -> bool:
    """Await a future of the background loop from another loop, for at most `max_wait` seconds.

    Never cancels the shared operation (other requests wait on it too) and tolerates the waiting
    loop being closed before the operation ends.
    """
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    def on_done(_: concurrent.futures.Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the waiting loop is closed: nobody to wake
            loop.call_soon_threadsafe(wake)

    future.add_done_callback(on_done)
    try:
        await asyncio.wait_for(woken, max_wait)
    except TimeoutError:
        return False
    return True
