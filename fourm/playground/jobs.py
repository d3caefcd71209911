"""A first-in first-out job queue with one worker thread: requests run one at a time (two cores do
not serve two generations at once any faster), each request can be polled for its place in the
queue, its stage, and its result or error, and no failing request stops the worker."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from fourm.playground.requests import BadRequest

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


class JobQueue:
    """``handler(payload, progress)`` runs on the worker thread for each submitted payload.

    ``max_waiting``: submissions beyond this many waiting jobs raise ``QueueFull``; ``keep``: the
    newest finished jobs kept for polling.
    """

    def __init__(self, handler: Callable[[Any, Callable[[str], None]], dict], max_waiting: int = 16, keep: int = 64):
        self.handler, self.max_waiting, self.keep = handler, max_waiting, keep
        self._jobs: OrderedDict[str, dict] = OrderedDict()
        self._waiting: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._worker = threading.Thread(target=self._loop, name="playground-worker", daemon=True)
        self._worker.start()

    def submit(self, payload) -> str:
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the queue is full ({len(self._waiting)} requests waiting): try again in a moment")
            job_id = f"job-{next(self._ids)}"
            self._jobs[job_id] = {"id": job_id, "state": "queued", "stage": "waiting", "submitted": time.time()}
            self._waiting.append(job_id)
        self._queue.put((job_id, payload))
        return job_id

    def status(self, job_id: str) -> dict | None:
        """{"id", "state": queued | running | done | error, "stage", "ahead" (jobs before this one),
        "result" or "error", "submitted", "started", "finished"} or None for an unknown id."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            out = dict(job)
            if job["state"] == "queued":
                running = any(j["state"] == "running" for j in self._jobs.values())
                out["ahead"] = self._waiting.index(job_id) + int(running)
            return out

    def _set(self, job_id: str, **fields) -> None:
        with self._lock:
            self._jobs[job_id].update(fields)

    def _loop(self) -> None:
        while True:
            job_id, payload = self._queue.get()
            with self._lock:
                self._waiting.remove(job_id)
                self._jobs[job_id].update(state="running", stage="starting", started=time.time())
            try:
                result = self.handler(payload, lambda stage: self._set(job_id, stage=stage))
                self._set(job_id, state="done", stage="done", result=result, finished=time.time())
            except BadRequest as exn:
                self._set(job_id, state="error", stage="failed", error=str(exn), finished=time.time())
            except Exception as exn:  # the server keeps serving whatever one request does
                log.exception("request %s failed", job_id)
                self._set(job_id, state="error", stage="failed", error=f"generation failed: {type(exn).__name__}: {exn}", finished=time.time())
            self._forget_old()

    def _forget_old(self) -> None:
        with self._lock:
            finished = [k for k, j in self._jobs.items() if j["state"] in ("done", "error")]
            for k in finished[: max(0, len(finished) - self.keep)]:
                del self._jobs[k]
