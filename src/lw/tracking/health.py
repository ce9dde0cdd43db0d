"""A tracking server's health: whether it refuses connections, a watch that notices it dying,
the one-line error for a job that lost it, and marking a run FAILED."""


from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from lw.errors import LwError

PROBE_S = 3.0        # how often a job checks that its tracking server accepts connections



DEAD_AFTER_S = 12.0  # refused that long (several probes in a row): the server is dead



def server_refuses(uri: str, timeout: float = 5.0) -> str | None:
    """Why the tracking server at ``uri`` is dead (connection refused or reset, host
    unreachable), or None: it accepts connections, or is only slow (a timeout), or the store
    is not a server."""
    url = urlparse(uri)
    if url.scheme not in ("http", "https"):
        return None
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https"
                                                             else 80)), timeout=timeout).close()
    except TimeoutError:
        return None
    except OSError as error:
        return error.strerror or type(error).__name__
    return None



class TrackingLost(LwError):
    """The tracking server died while a job ran (ServerWatch)."""



class ServerWatch:
    """Ends the job once its tracking server has refused connections for ``dead_after``
    seconds, whatever the job is doing (a forward pass, a metric, an upload): a probe every
    ``every`` seconds from a daemon thread, then TrackingLost raised in the main thread. A
    slow server (probes time out, requests take minutes) is waited for."""

    def __init__(self, uri: str, every: float = PROBE_S, dead_after: float = DEAD_AFTER_S):
        self.uri, self.every, self.dead_after = uri, every, dead_after
        self.dead: str | None = None
        self.lock, self.stop_event = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="lw-server-watch")
        self.previous_handler = None

    def _watch(self) -> None:
        refused_since = None
        while not self.stop_event.wait(self.every):
            why = server_refuses(self.uri, timeout=self.every)
            if why is None:
                refused_since = None
                continue
            refused_since = refused_since or time.monotonic() - self.every
            if time.monotonic() - refused_since >= self.dead_after:
                with self.lock:
                    if not self.stop_event.is_set():
                        self.dead = why
                        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                return

    def _raise(self, *_) -> None:
        raise TrackingLost(f"tracking server {self.uri} is unreachable ({self.dead}) for "
                           f"{self.dead_after:.0f} s")

    def __enter__(self) -> ServerWatch:
        watched = urlparse(self.uri).scheme in ("http", "https")
        if watched and threading.current_thread() is threading.main_thread():
            self.previous_handler = signal.signal(signal.SIGUSR1, self._raise)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.stop_event.set()
        if self.previous_handler is not None:
            signal.signal(signal.SIGUSR1, self.previous_handler)



def is_connection_failure(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a tracking request that found no server."""
    import requests

    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, (TrackingLost, requests.exceptions.ConnectionError,
                              ConnectionRefusedError, ConnectionResetError)):
            return True
        text = str(error)
        if any(s in text for s in ("Max retries exceeded", "Connection refused",
                                    "Connection reset", "Connection aborted")):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False



def tracking_lost(error: BaseException, uri: str, folder: Path) -> LwError | None:
    """The one-line error for a job whose tracking server went away (None for other errors):
    the URI, and where the job's results are kept (lw.sync puts them in the store)."""
    if isinstance(error, LwError) and not isinstance(error, TrackingLost):
        return None  # already says what to do (client_for's unreachable server included)
    if not is_connection_failure(error) or server_refuses(uri) is None and \
            not isinstance(error, TrackingLost):
        return None
    results = Path(folder) / "results" / "table.csv"
    kept = (f"its results are kept in {folder}; `python -m lw.sync {folder}` logs them once "
            "the server is back" if results.exists() else
            "the job did not finish; run it again once the server is back")
    if isinstance(error, TrackingLost):
        return LwError(f"{error}: {kept}")
    return LwError(f"tracking server {uri} is unreachable "
                   f"({server_refuses(uri) or 'connection failed'}): {kept}")



def fail_run(client, run_id: str, error: BaseException, uri: str, folder: Path | None) -> None:
    """Mark the run FAILED with its error (tag ``lw.error``, artifact ``error.txt``), each
    step on its own, so that one failing (a full disk) does not leave the run RUNNING; on a
    dead server there is nothing to mark (lw.sync logs the kept results later)."""
    import traceback

    text = "".join(traceback.format_exception(error))
    if folder is not None:
        try:
            (Path(folder) / "error.txt").write_text(text)
        except OSError:
            pass
    if server_refuses(uri) is not None:
        return
    for step in (lambda: client.set_tag(run_id, "lw.error",
                                        f"{type(error).__name__}: {error}"[:5000]),
                 lambda: client.set_terminated(run_id, "FAILED"),
                 lambda: client.log_text(run_id, text, "error.txt")):
        try:
            step()
        except Exception:  # noqa: BLE001 - the next step may still get through
            pass
