"""The event loop that synchronous clients and clusters run on.

minidask's servers and clients are written with asyncio. A learner calls
them from a notebook or a script, synchronously, so one event loop runs in
a background thread of the process and every synchronous call is handed to
it (:func:`sync`). That also works inside Jupyter, whose kernel already
runs an asyncio loop in the main thread: the two never meet.
"""

import asyncio
import concurrent.futures
import threading

_loop = None
_thread = None
_lock = threading.Lock()


def get_loop():
    """The process's minidask loop, started on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed():
            ready = threading.Event()
            loop = asyncio.new_event_loop()

            def run():
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=run, name="minidask-loop",
                                       daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


def in_loop_thread():
    return threading.current_thread() is _thread


def sync(coro, timeout=None):
    """Run ``coro`` on the minidask loop and wait for its result."""
    if in_loop_thread():
        coro.close()
        raise RuntimeError(
            "a synchronous minidask call was made from minidask's own event "
            "loop thread (a callback?): it would wait for itself forever")
    future = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        if future.done():  # the coroutine's own TimeoutError: keep it
            raise
        future.cancel()
        raise TimeoutError(f"no answer within {timeout} s") from None


def call_soon(func, *args):
    """Call ``func(*args)`` on the minidask loop, from any thread."""
    loop = get_loop()
    if loop.is_closed():
        return
    loop.call_soon_threadsafe(func, *args)
