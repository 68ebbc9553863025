"""A reload across worker processes: every worker switches to the new model, or none does.

Each worker listens on a Unix socket in the run directory (control/<pid>). The worker that gets
`POST /admin/reload` (or SIGHUP; the supervisor forwards its SIGHUP to one worker) coordinates, in two
phases, over one connection per peer:

    coordinator -> peer   {"prepare": "<model dir>"}    the peer loads, verifies and warms the model up
    peer -> coordinator   {"ok": true, "model": ...} or {"ok": false, "error": ...}
    coordinator -> peer   {"commit": true|false}         serve it, or drop it when any worker failed
    peer -> coordinator   {"ok": true}

The new directory is recorded in the run directory before the commits, so a worker that dies and is
replaced meanwhile starts on it. The run directory's lock keeps one reload at a time across processes,
and keeps a starting worker from missing one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from fastapi import FastAPI

from app.config import Settings
from app.engine import Engine
from app.errors import ReloadFailed, ReloadInProgress, ShapeChangeRefused
from app.metrics import Metrics
from app.reload import LOAD_ERRORS, ModelReloader, Reloaded, shown_directory
from app.server.rundir import RunDirectory

logger = logging.getLogger(__name__)

# A reload must answer before the request guard's 504 (VAE_REQUEST_TIMEOUT_SECONDS): a worker that has not
# loaded the model by this share of it fails the reload.
PEER_TIMEOUT_SHARE = 0.8


def peer_timeout_seconds(settings: Settings) -> float:
    return PEER_TIMEOUT_SHARE * settings.request_timeout_seconds


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()


async def _receive(reader: asyncio.StreamReader, timeout_seconds: float) -> dict[str, Any] | None:
    line = await asyncio.wait_for(reader.readline(), timeout_seconds)
    return json.loads(line) if line else None


class Peer:
    """One other worker, during one reload."""

    def __init__(
        self, pid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_seconds: float
    ) -> None:
        self.pid = pid
        self.reader = reader
        self.writer = writer
        self.timeout_seconds = timeout_seconds

    async def prepare(self, model_dir: Path) -> str | None:
        """The peer's reason it cannot serve `model_dir`, or None once it has loaded it."""
        try:
            await _send(self.writer, {"prepare": str(model_dir)})
            answer = await _receive(self.reader, self.timeout_seconds)
        except TimeoutError:
            return f"no answer within {self.timeout_seconds:g} s"
        except (OSError, ValueError) as error:
            return f"the control connection failed ({error!r})"
        if answer is None:
            return "the worker exited"
        return None if answer["ok"] else str(answer["error"])

    async def finish(self, commit: bool) -> bool:
        """Tell the peer to serve the prepared model (or drop it); True once it serves it."""
        try:
            await _send(self.writer, {"commit": commit})
            answer = await _receive(self.reader, self.timeout_seconds) if commit else None
            return answer is not None and bool(answer["ok"])
        except (OSError, TimeoutError, ValueError):
            return False
        finally:
            self.writer.close()


async def connect_peers(run: RunDirectory, timeout_seconds: float) -> list[Peer]:
    """Connections to every other worker that is alive (a dead one's socket refuses)."""
    peers = []
    for pid, path in sorted(run.workers().items()):
        if pid == os.getpid():
            continue
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except (ConnectionRefusedError, FileNotFoundError):
            continue  # died; its replacement starts on the recorded model directory
        peers.append(Peer(pid, reader, writer, timeout_seconds))
    return peers


class GroupReloader(ModelReloader):
    """The reloader of one worker in a group: coordinates reloads it is asked for, joins the others'."""

    def __init__(
        self, app: FastAPI, settings: Settings, metrics: Metrics, run: RunDirectory, start_lock: IO[bytes]
    ) -> None:
        super().__init__(app, settings, metrics)
        self.run = run
        self.served_dir = run.served_model_dir() or self.served_dir
        self._start_lock: IO[bytes] | None = start_lock
        self._control: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Open this worker's control socket, then let reloads run: from now on they include it."""
        path = self.run.control_socket(os.getpid())
        self._control = await asyncio.start_unix_server(self._answer, path=str(path))
        if self._start_lock is not None:
            self._start_lock.close()
            self._start_lock = None

    async def reload(self, model_dir: Path | None = None, allow_shape_change: bool = False) -> Reloaded:
        lock = self.run.try_lock_for_reload()
        if lock is None or self._lock.locked():
            if lock is not None:
                lock.close()
            raise ReloadInProgress()
        try:
            async with self._lock:
                target, shown = model_dir or self.served_dir, shown_directory(model_dir)
                return await self._reload_everywhere(target, shown, allow_shape_change)
        finally:
            lock.close()

    async def _reload_everywhere(self, target: Path, shown: str, allow_shape_change: bool) -> Reloaded:
        peers = await connect_peers(self.run, peer_timeout_seconds(self.settings))
        local, *remote = await asyncio.gather(
            self._prepare_here(target), *(peer.prepare(target) for peer in peers)
        )
        outcomes = {os.getpid(): local, **dict(zip((peer.pid for peer in peers), remote, strict=True))}
        failures = [
            f"worker {pid}: {str(outcome) or type(outcome).__name__}"
            for pid, outcome in outcomes.items()
            if outcome is not None and not isinstance(outcome, Engine)
        ]
        if failures or not isinstance(local, Engine):
            await asyncio.gather(*(peer.finish(commit=False) for peer in peers))
            self.metrics.model_reloads.labels(result="failure").inc()
            raise ReloadFailed(shown, "; ".join(failures).replace(str(target), shown))
        try:
            self.refuse_shape_change(local, shown, allow_shape_change)
        except ShapeChangeRefused:
            await asyncio.gather(*(peer.finish(commit=False) for peer in peers))
            raise
        # Every worker has the model: switch them all, even if this request is cancelled meanwhile.
        return await asyncio.shield(self._switch_everywhere(local, target, peers))

    async def _switch_everywhere(self, local: Engine, target: Path, peers: list[Peer]) -> Reloaded:
        self.run.set_served_model_dir(target)
        self.serve(local)
        switched = await asyncio.gather(*(peer.finish(commit=True) for peer in peers))
        self.metrics.model_reloads.labels(result="success").inc()
        workers, workers_switched = 1 + len(peers), 1 + sum(switched)
        if workers_switched < workers:
            logger.error(
                "reload: %d of %d workers switched to %s; the others exited meanwhile, and their "
                "replacements start on it",
                workers_switched,
                workers,
                local.version_label,
            )
        return Reloaded(local.version_label, target, workers=workers, workers_switched=workers_switched)

    async def _prepare_here(self, target: Path) -> Engine | str:
        try:
            return await self.load(target)
        except LOAD_ERRORS as error:
            return str(error)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One control connection: a coordinator's prepare and commit, or the supervisor's reload."""
        timeout_seconds = peer_timeout_seconds(self.settings)
        try:
            request = await _receive(reader, timeout_seconds)
            if request is None:
                return
            if "reload" in request:
                await _send(writer, await self._reload_for_supervisor())
                return
            prepared = await self._prepare_here(Path(request["prepare"]))
            if not isinstance(prepared, Engine):
                await _send(writer, {"ok": False, "error": prepared})
                return
            await _send(writer, {"ok": True, "model": prepared.version_label})
            # The coordinator waits for the slowest worker's answer, each bounded alike.
            decision = await _receive(reader, 2 * timeout_seconds)
            if decision is not None and decision.get("commit"):
                self.serve(prepared)
                await _send(writer, {"ok": True})
        except (OSError, TimeoutError, ValueError, KeyError) as error:
            logger.warning("control connection dropped: %r", error)
        finally:
            writer.close()

    async def _reload_for_supervisor(self) -> dict[str, Any]:
        try:
            done = await self.reload()
        except (ReloadInProgress, ReloadFailed, ShapeChangeRefused) as error:
            logger.error("SIGHUP reload: %s", error.detail)
            return {"ok": False, "error": error.detail}
        return {"ok": True, "model": done.model, "workers": done.workers, "switched": done.workers_switched}

    async def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            with contextlib.suppress(FileNotFoundError):
                self.run.control_socket(os.getpid()).unlink()
        await super().stop()


async def ask_a_worker_to_reload(run: RunDirectory, settings: Settings) -> dict[str, Any]:
    """The supervisor's SIGHUP: one live worker reloads the served directory on every worker."""
    for pid, path in sorted(run.workers().items()):
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except (ConnectionRefusedError, FileNotFoundError):
            continue
        try:
            await _send(writer, {"reload": None})
            answer = await _receive(reader, 3 * peer_timeout_seconds(settings))
        except (OSError, TimeoutError, ValueError) as error:
            return {"ok": False, "error": f"worker {pid} did not answer ({error!r})"}
        finally:
            writer.close()
        if answer is not None:
            return answer
    return {"ok": False, "error": "no worker is running"}
