"""The thread that owns the Engine for the HTTP server.

The engine is single-threaded, so only this thread touches it. The event loop posts "add" and "abort"
commands to an inbox; the thread applies them between engine steps, runs ``step()`` while any request is
unfinished, and hands each RequestOutput to the asyncio queue of its HTTP request with
``loop.call_soon_threadsafe``. When idle it sleeps on the inbox, so an idle server costs no CPU.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Sequence

from ..infer.engine import Engine, RequestOutput, SamplingParams

log = logging.getLogger("dsv3.serve")

_STOP = object()


class EngineFailure(RuntimeError):
    """engine.step() raised; every request in flight at that moment is ended with this error."""


class Submission:
    """The engine requests of one HTTP request (one per prompt), whose outputs arrive on one queue.

    Iterate it for RequestOutputs until every request has finished; ``cancel()`` aborts the unfinished ones
    (the client went away) and is safe to call more than once.
    """

    def __init__(self, runner: EngineRunner, request_ids: list[str], outputs: asyncio.Queue):
        self.runner = runner
        self.request_ids = request_ids
        self._queue = outputs
        self._unfinished = set(request_ids)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._unfinished.clear()
            raise EngineFailure(f"the engine failed while generating: {item!r}") from item
        if item.finished:
            self._unfinished.discard(item.request_id)
        return item

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def cancel(self) -> None:
        if self._unfinished:
            self.runner.abort(sorted(self._unfinished))
            self._unfinished.clear()


class EngineRunner:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # request id -> queue
        self._thread: threading.Thread | None = None
        self.stats: dict = dict(engine.stats)  # a snapshot, replaced (never mutated) by the engine thread

    # ---- lifecycle (event-loop side) -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._inbox.put((_STOP,))
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- requests (event-loop side) --------------------------------------------------------------------
    async def submit(self, prompts: Sequence[list[int]], params: SamplingParams, request_id: str) -> Submission:
        """Add one engine request per prompt (ids ``{request_id}-{i}``). Raises what ``Engine.add_request``
        raises (ValueError, RequestTooLong, EngineFull); then none of the prompts stays queued."""
        if not self.alive:
            raise EngineFailure("the engine thread is not running")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        outputs: asyncio.Queue = asyncio.Queue()
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self._inbox.put(("add", ids, list(prompts), params, loop, outputs, done))
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:  # the client left while we waited: drop the requests once added
            done.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self.abort(ids))
            raise
        return Submission(self, ids, outputs)

    def abort(self, request_ids: Sequence[str]) -> None:
        self._inbox.put(("abort", list(request_ids)))

    # ---- the engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0  # in a row
        while True:
            if not self._apply_commands(block=not self.engine.has_unfinished()):
                return
            if not self.engine.has_unfinished():
                self._publish_stats()
                continue
            try:
                outputs = self.engine.step()
                failures = 0
            except Exception as e:  # keep serving: fail the requests in flight, not the server
                log.exception("engine.step() failed; ending the %d requests in flight", len(self._routes))
                self._fail_all(e)
                failures += 1
                time.sleep(min(1.0, 0.01 * 2**failures))  # no hot loop if the engine keeps failing
                continue
            self._publish_stats()  # first, so a client that has its final output sees its request gone
            for out in outputs:
                route = self._routes.get(out.request_id)
                if route is None:  # aborted after this step started
                    continue
                if out.finished:
                    del self._routes[out.request_id]
                self._deliver(route, out)

    def _apply_commands(self, block: bool) -> bool:
        """Apply the queued add/abort commands (waiting for one when ``block``); False once asked to stop."""
        while True:
            try:
                cmd = self._inbox.get() if block else self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if cmd[0] is _STOP:
                for rid in list(self._routes):
                    self.engine.abort(rid)
                self._routes.clear()
                return False
            if cmd[0] == "abort":
                for rid in cmd[1]:
                    self._routes.pop(rid, None)
                    self.engine.abort(rid)
                self._publish_stats()
            else:
                self._add(*cmd[1:])

    def _add(self, ids, prompts, params, loop, outputs, done) -> None:
        added: list[str] = []
        try:
            for rid, prompt in zip(ids, prompts):
                self.engine.add_request(prompt, params, request_id=rid)
                added.append(rid)
        except Exception as e:  # refused (bad value, too long, queue full): nothing of this HTTP request stays
            for rid in added:
                self.engine.abort(rid)
            _call(loop, _resolve, done, e)
            return
        for rid in ids:
            self._routes[rid] = (loop, outputs)
        _call(loop, _resolve, done, None)

    def _deliver(self, route, item) -> None:
        loop, outputs = route
        _call(loop, outputs.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        routes, self._routes = self._routes, {}
        for rid in routes:
            try:
                self.engine.abort(rid)
            except Exception:  # the engine is already in trouble; the error below is what the client sees
                log.exception("engine.abort(%s) failed", rid)
        self._publish_stats()
        for route in routes.values():
            self._deliver(route, error)

    def _publish_stats(self) -> None:
        self.stats = dict(self.engine.stats)


def _resolve(done: asyncio.Future, error: Exception | None) -> None:
    if done.done():  # cancelled by a client that left
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed (server shutting down): nobody is listening
        pass
