"""``MooncakeDistributedStoreAsync``: the store client for asyncio code.

Every method of ``MooncakeDistributedStore`` has an awaitable twin named ``async_<method>`` (``await
store.async_put(key, value)``, ``await store.async_batch_get_into(...)``, ...), as upstream's class does. The call
runs on the event loop's default executor; the store releases the GIL for its whole duration, so the loop keeps
running (and other calls run in parallel) while it waits. The synchronous methods stay available.
"""

import asyncio
import functools
from typing import Any, Awaitable, Callable

from mooncake.store import MooncakeDistributedStore

__all__ = ["MooncakeDistributedStore", "MooncakeDistributedStoreAsync"]

_PREFIX = "async_"


class MooncakeDistributedStoreAsync(MooncakeDistributedStore):
    """A store client whose methods also come as coroutines: ``async_<name>`` for each method ``<name>``."""

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        # Only reached for names the instance and class do not have.
        if not name.startswith(_PREFIX):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        target = name[len(_PREFIX) :]
        method = getattr(self, target, None)
        if method is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}' (nor '{target}')")
        if not callable(method):
            raise AttributeError(f"'{target}' is not callable")
        coroutine = _in_executor(method)
        # Later lookups find it on the instance without coming back here.
        setattr(self, name, coroutine)
        return coroutine


def _in_executor(method: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """A coroutine function that runs ``method`` on the running loop's default executor."""

    @functools.wraps(method)
    async def call(*args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(method, *args, **kwargs))

    return call
