"""How many pixels the front end decodes at once. A small PNG can declare 40 million pixels, and each pixel
decoded costs several bytes (4 in PIL's RGB, up to 20 for a 16-bit greyscale image on its way to 8-bit RGB):
without a bound, a few concurrent requests multiply the front end's memory. Requests hold their image's pixel
count from this budget while it is decoded and wait, in a bounded line, while the budget is spent (503 with
Retry-After beyond it)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from disco.serve.batching import Refused


class PixelBudget:
    def __init__(self, total: int, max_waiting: int):
        self.total, self.free, self.max_waiting = total, total, max_waiting
        self.waiting = 0
        self._released = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """`pixels` of the budget for the duration of the block (all of it when more: one image at a time)."""
        pixels = min(pixels, self.total)
        async with self._released:
            if self.free < pixels:
                if self.waiting >= self.max_waiting:
                    raise Refused(503, "busy", f"{self.waiting} images wait to be decoded (--queue-size) while "
                                  f"{self.total - self.free:,} pixels are (--max-decode-pixels)", retry_after=1)
                self.waiting += 1
                try:
                    await self._released.wait_for(lambda: self.free >= pixels)
                finally:
                    self.waiting -= 1
            self.free -= pixels
        try:
            yield
        finally:
            async with self._released:
                self.free += pixels
                self._released.notify_all()
