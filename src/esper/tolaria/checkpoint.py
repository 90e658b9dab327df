"""Atomic checkpoints: tensors in safetensors, everything else in JSON, never pickle.

A checkpoint is two files, `ckpt-<step>.safetensors` then `ckpt-<step>.json`. Each is written to a
temporary name, fsynced and renamed into place; one fsync of the directory, after the JSON's rename, makes
both renames durable. The JSON is written last and names the tensors file with its SHA-256: a checkpoint
counts only when its JSON exists and the hash matches, so a crash at any instant leaves the previous
checkpoint as the latest valid one (a crash before the directory's fsync may keep the JSON's rename and
lose the tensors file's: that checkpoint does not verify, and reading falls back to the one before; older
checkpoints are pruned only after the directory's fsync).

The caller hands over a snapshot (tensors it cloned, JSON-able meta) and goes on training while a writer
thread serialises, writes and fsyncs it: the fsyncs cost the training loop nothing. One checkpoint is in
flight at a time; the next `save`, `flush`, `steps` or `latest` waits for it, and a write that failed
raises its `CheckpointError` there, never silently. Whoever must know when a checkpoint is durable (what it
covers may then leave the process) passes `on_durable`, which the writer thread runs once the JSON is.

Reading trusts neither file: a JSON that is not a checkpoint record (`[]`, no `meta`, a wrong type), or a
tensors file that does not decode, is a `CheckpointError`, and `latest()` falls back to the newest
checkpoint that is whole, telling its caller which ones it skipped and why. With none whole it raises
`NoValidCheckpoint`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from esper.leyline import CONTRACT_VERSION, EsperError, check_contract_version
from esper.leyline.files import replace_synced, write_atomically
from esper.leyline.wire import UNVERSIONED

_NAME = re.compile(r"^ckpt-(\d{9})\.json$")


class CheckpointError(EsperError):
    """A checkpoint cannot be written or read."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"checkpoint {path}: {reason}")


class NoValidCheckpoint(CheckpointError):
    """Checkpoints exist but none of them is whole; `damaged` holds each one's error, newest first."""

    def __init__(self, directory: Path, damaged: list[CheckpointError]) -> None:
        self.damaged = damaged
        reasons = "; ".join(f"{error.path.name}: {error.reason}" for error in damaged)
        super().__init__(directory, f"no valid checkpoint ({reasons})")


def decode_record(blob: bytes, path: Path) -> dict[str, Any]:
    """The checkpoint record in `blob` (the JSON file's bytes), checked field by field.

    Anything else (bytes that are not UTF-8 JSON, a JSON value that is not a record, a missing or
    ill-typed field, a tensors file name that leaves the directory) is a `CheckpointError`."""
    try:
        record = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(path, f"not JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise CheckpointError(path, f"not a checkpoint record (a JSON {type(record).__name__})")
    fields: dict[str, type | tuple[type, ...]] = {
        "step": int,
        "tensors_file": str,
        "tensors_sha256": str,
        "meta": dict,
    }
    for name, kind in fields.items():
        if name not in record:
            raise CheckpointError(path, f"record lacks {name!r}")
        value = record[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(path, f"{name!r} is a {type(value).__name__}, not a {kind}")
    if record["step"] < 0:
        raise CheckpointError(path, f"step is {record['step']}")
    name = record["tensors_file"]
    if Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(path, f"tensors file {name!r} is not a file name in the checkpoint directory")
    return record


def decode_tensors(blob: bytes, path: Path) -> dict[str, Tensor]:
    """The tensors in `blob` (safetensors bytes); bytes that do not decode are a `CheckpointError`."""
    try:
        return load_tensors(blob)
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(path, f"tensors do not decode: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Checkpoint:
    """One loaded checkpoint."""

    step: int
    tensors: dict[str, Tensor]
    meta: dict[str, Any]


class CheckpointStore:
    """The checkpoints of one run, in `directory`, keeping the newest `keep`."""

    def __init__(self, directory: Path, *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = directory
        self.keep = keep
        # One writer thread, started with the first save and kept: starting a thread per checkpoint cost
        # the training thread ~0.8 ms each time (Thread.start waits for it to run).
        self._writer: ThreadPoolExecutor | None = None
        self._in_flight: Future[None] | None = None
        self._error: CheckpointError | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def save(
        self,
        step: int,
        tensors: dict[str, Tensor],
        meta: dict[str, Any],
        *,
        before_commit: Callable[[], None] | None = None,
        on_durable: Callable[[], None] | None = None,
    ) -> Path:
        """Start writing the checkpoint of `step` on the writer thread; returns its JSON path.

        `tensors` must be a snapshot the caller will not change (clones); `meta` is copied here.
        `before_commit` runs on the writer thread before the JSON makes the checkpoint count (e.g. to
        fsync the logs whose sizes `meta` records); `on_durable` runs on it after the JSON and its
        directory entry are fsynced (never for a write that failed). An earlier write that failed, or
        an `on_durable` that raised, raises here."""
        self.flush()
        json_path = self.directory / f"ckpt-{step:09d}.json"
        try:
            frozen_meta = json.loads(json.dumps(meta))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(json_path, f"meta is not JSON: {exc}") from exc
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        # A crash mid-write leaves the previous checkpoint valid (atomic renames); at interpreter exit the
        # write in flight is finished first.
        self._in_flight = self._writer.submit(
            self._write_guarded, step, tensors, frozen_meta, before_commit, on_durable
        )
        return json_path

    def flush(self) -> None:
        """Wait for the checkpoint in flight; raise its `CheckpointError` if the write failed."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()  # `_write_guarded` keeps every failure in `_error`: nothing raises here
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write_guarded(
        self,
        step: int,
        tensors: dict[str, Tensor],
        meta: dict[str, Any],
        before_commit: Callable[[], None] | None,
        on_durable: Callable[[], None] | None,
    ) -> None:
        try:
            self._write(step, tensors, meta, before_commit, on_durable)
        except CheckpointError as exc:
            self._error = exc
        except Exception as exc:  # noqa: BLE001 - whatever failed reaches the training thread at its next flush
            self._error = CheckpointError(
                self.directory / f"ckpt-{step:09d}.json", f"write failed: {type(exc).__name__}: {exc}"
            )

    def _write(
        self,
        step: int,
        tensors: dict[str, Tensor],
        meta: dict[str, Any],
        before_commit: Callable[[], None] | None,
        on_durable: Callable[[], None] | None = None,
    ) -> None:
        blob = save_tensors({name: t.contiguous() for name, t in tensors.items()})
        tensor_path = self.directory / f"ckpt-{step:09d}.safetensors"
        json_path = self.directory / f"ckpt-{step:09d}.json"
        try:
            replace_synced(tensor_path, blob)  # the JSON's directory fsync covers this rename too
            if before_commit is not None:
                before_commit()
            record = {
                "step": step,
                "leyline_contract": CONTRACT_VERSION,
                "tensors_file": tensor_path.name,
                "tensors_sha256": hashlib.sha256(blob).hexdigest(),
                "meta": meta,
            }
            write_atomically(json_path, json.dumps(record, sort_keys=True).encode())
        except OSError as exc:
            raise CheckpointError(json_path, f"write failed: {exc}") from exc
        if on_durable is not None:
            try:
                on_durable()
            except Exception as exc:  # the training thread hears of it at its next flush
                reason = f"written, but what runs once it is durable failed: {type(exc).__name__}: {exc}"
                raise CheckpointError(json_path, reason) from exc
        self._prune()

    def steps(self) -> list[int]:
        """Steps of the checkpoints whose JSON is present, oldest first (after the one in flight)."""
        self.flush()
        return self._steps_on_disk()

    def _steps_on_disk(self) -> list[int]:
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def load(self, step: int) -> Checkpoint:
        """The checkpoint of `step`, verified against its hash."""
        json_path = self.directory / f"ckpt-{step:09d}.json"
        try:
            record = decode_record(json_path.read_bytes(), json_path)
            tensors_path = self.directory / record["tensors_file"]
            blob = tensors_path.read_bytes()
        except OSError as exc:
            raise CheckpointError(json_path, f"unreadable: {exc}") from exc
        _check_contract(json_path, record)
        if record["step"] != step:
            raise CheckpointError(json_path, f"records step {record['step']}, its name says {step}")
        if hashlib.sha256(blob).hexdigest() != record["tensors_sha256"]:
            raise CheckpointError(json_path, "tensors file does not match its recorded SHA-256")
        return Checkpoint(step=step, tensors=decode_tensors(blob, tensors_path), meta=record["meta"])

    def latest(
        self,
        on_damaged: Callable[[CheckpointError], None] | None = None,
        check: Callable[[Checkpoint], None] | None = None,
    ) -> Checkpoint | None:
        """The newest checkpoint that verifies (and passes `check`, which raises `CheckpointError` for a
        checkpoint its owner cannot use); None when there is none.

        Each newer checkpoint skipped as damaged is passed to `on_damaged` (newest first) before the one
        returned; when every checkpoint is damaged, `NoValidCheckpoint` names them all."""
        errors: list[CheckpointError] = []
        for step in reversed(self.steps()):
            try:
                checkpoint = self.load(step)
                if check is not None:
                    check(checkpoint)
            except CheckpointError as exc:
                errors.append(exc)
                continue
            if on_damaged is not None:
                for error in errors:
                    on_damaged(error)
            return checkpoint
        if errors:
            raise NoValidCheckpoint(self.directory, errors)
        return None

    def _prune(self) -> None:
        for step in self._steps_on_disk()[: -self.keep]:
            for suffix in (".json", ".safetensors"):
                (self.directory / f"ckpt-{step:09d}{suffix}").unlink(missing_ok=True)


def _check_contract(path: Path, record: dict[str, Any]) -> None:
    """Refuse a checkpoint written under another Leyline contract (`ContractVersionMismatch`)."""
    found = record.get("leyline_contract", UNVERSIONED)
    check_contract_version(f"checkpoint {path}", found if isinstance(found, int) else UNVERSIONED)
