"""Model changes across worker processes: every worker switches to the new state, or none does.

Each worker listens on a Unix socket in the run directory (control/<pid>). The worker that gets a load,
unload or reload (the repository API, `POST /admin/reload`, or SIGHUP, which the supervisor forwards to one
worker) coordinates, in two phases, over one connection per peer:

    coordinator -> peer   {"prepare": {"action", "model", "model_dir"}}   the peer loads, verifies and warms
                                                                           the model up (nothing to unload)
    peer -> coordinator   {"ok": true} or {"ok": false, "error": ...}
    coordinator -> peer   {"commit": true|false}         serve it (or unload), or drop it when any failed
    peer -> coordinator   {"ok": true}

The models every worker serves are recorded in the run directory before the commits, so a worker that dies
and is replaced meanwhile starts on them. The run directory's lock keeps one change at a time across
processes, and keeps a starting worker from missing one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from app.config import Settings
from app.control import Change, Changed, ModelControl, Prepared
from app.errors import ReloadFailed, ReloadInProgress, ShapeChangeRefused
from app.metrics import Metrics
from app.registry import ModelRegistry
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

    async def prepare(self, change: Change) -> str | None:
        """The peer's reason it cannot make `change`, or None once it is ready to."""
        try:
            await _send(self.writer, {"prepare": change_message(change)})
            answer = await _receive(self.reader, self.timeout_seconds)
        except TimeoutError:
            return f"no answer within {self.timeout_seconds:g} s"
        except (OSError, ValueError) as error:
            return f"the control connection failed ({error!r})"
        if answer is None:
            return "the worker exited"
        return None if answer["ok"] else str(answer["error"])

    async def finish(self, commit: bool) -> bool:
        """Tell the peer to make the prepared change (or drop it); True once it has."""
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


def change_message(change: Change) -> dict[str, Any]:
    return {
        "action": change.action,
        "model": change.model,
        "model_dir": str(change.model_dir) if change.model_dir is not None else None,
        "allow_shape_change": change.allow_shape_change,
    }


def change_from_message(message: dict[str, Any]) -> Change:
    model_dir = message["model_dir"]
    return Change(
        message["action"],
        message["model"],
        Path(model_dir) if model_dir is not None else None,
        bool(message["allow_shape_change"]),
    )


class GroupControl(ModelControl):
    """The model control of one worker in a group: coordinates the changes it is asked for, joins the
    others'."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        metrics: Metrics,
        run: RunDirectory,
        start_lock: IO[bytes],
    ) -> None:
        super().__init__(registry, settings, metrics)
        self.run = run
        self._start_lock: IO[bytes] | None = start_lock
        self._control: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Open this worker's control socket, then let changes run: from now on they include it."""
        path = self.run.control_socket(os.getpid())
        self._control = await asyncio.start_unix_server(self._answer, path=str(path))
        if self._start_lock is not None:
            self._start_lock.close()
            self._start_lock = None

    def exclusive(self) -> Callable[[], None]:
        """The run directory's reload lock, held exclusively: one change at a time across the workers."""
        lock = self.run.try_lock_for_reload()
        if lock is None:
            raise ReloadInProgress()
        return lock.close

    async def _apply(self, change: Change) -> Changed:
        peers = await connect_peers(self.run, peer_timeout_seconds(self.settings))
        local, *remote = await asyncio.gather(self.prepare(change), *(peer.prepare(change) for peer in peers))
        outcomes = {os.getpid(): local, **dict(zip((peer.pid for peer in peers), remote, strict=True))}
        failures = [
            f"worker {pid}: {outcome}" for pid, outcome in outcomes.items() if isinstance(outcome, str)
        ]
        if failures or not isinstance(local, Prepared):
            await asyncio.gather(*(peer.finish(commit=False) for peer in peers))
            if isinstance(local, Prepared):
                self.discard(local)
            self._count(change, "failure")
            shown = self._shown(change)
            raise self.failure(change, "; ".join(failures).replace(str(change.model_dir), shown))
        try:
            self.refuse_shape_change(local)
        except ShapeChangeRefused:
            await asyncio.gather(*(peer.finish(commit=False) for peer in peers))
            raise
        # Every worker is ready: switch them all, even if this request is cancelled meanwhile.
        return await asyncio.shield(self._commit_everywhere(local, peers))

    async def _commit_everywhere(self, local: Prepared, peers: list[Peer]) -> Changed:
        change = local.change
        served = self.run.served_models() or self.served_models()
        if local.engine is not None:
            served[change.model] = str(local.engine.model_dir)
        else:
            served.pop(change.model, None)
        self.run.set_served_models(served)
        await self.commit(local)
        switched = await asyncio.gather(*(peer.finish(commit=True) for peer in peers))
        self._count(change, "success")
        workers, workers_switched = 1 + len(peers), 1 + sum(switched)
        if workers_switched < workers:
            logger.error(
                "%s of model %s: %d of %d workers switched; the others exited meanwhile, and their "
                "replacements start on the new state",
                change.action,
                change.model,
                workers_switched,
                workers,
            )
        return self.changed(change, workers, workers_switched)

    def served_models(self) -> dict[str, str]:
        """The models this worker serves, by name, with the directory each is served from."""
        return {model.name: str(model.served_dir) for model in self.registry if model.engine is not None}

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
            prepared = await self.prepare(change_from_message(request["prepare"]))
            if not isinstance(prepared, Prepared):
                await _send(writer, {"ok": False, "error": prepared})
                return
            await _send(writer, {"ok": True})
            # The coordinator waits for the slowest worker's answer, each bounded alike.
            decision = await _receive(reader, 2 * timeout_seconds)
            if decision is not None and decision.get("commit"):
                await self.commit(prepared)
                await _send(writer, {"ok": True})
            else:
                self.discard(prepared)
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
        return {
            "ok": True,
            "model": done.version_label,
            "workers": done.workers,
            "switched": done.workers_switched,
        }

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
