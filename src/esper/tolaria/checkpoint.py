"""Atomic checkpoints: tensors in safetensors, everything else in JSON, never pickle.

A checkpoint is two files, `ckpt-<step>.safetensors` then `ckpt-<step>.json`. Each is written to a
temporary name, fsynced, renamed into place, and the directory fsynced. The JSON is written last and
names the tensors file with its SHA-256: a checkpoint counts only when its JSON exists and the hash
matches, so a crash at any instant leaves the previous checkpoint as the latest valid one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from esper.leyline import EsperError
from esper.leyline.files import write_atomically

_NAME = re.compile(r"^ckpt-(\d{9})\.json$")


class CheckpointError(EsperError):
    """A checkpoint cannot be written or read."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"checkpoint {path}: {reason}")


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
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, step: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
        """Write the checkpoint of `step`; returns its JSON path."""
        blob = save_tensors({name: t.contiguous() for name, t in tensors.items()})
        tensor_path = self.directory / f"ckpt-{step:09d}.safetensors"
        json_path = self.directory / f"ckpt-{step:09d}.json"
        try:
            write_atomically(tensor_path, blob)
            record = {
                "step": step,
                "tensors_file": tensor_path.name,
                "tensors_sha256": hashlib.sha256(blob).hexdigest(),
                "meta": meta,
            }
            write_atomically(json_path, json.dumps(record, sort_keys=True).encode())
        except OSError as exc:
            raise CheckpointError(json_path, f"write failed: {exc}") from exc
        self._prune()
        return json_path

    def steps(self) -> list[int]:
        """Steps of the checkpoints whose JSON is present, oldest first."""
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
            record = json.loads(json_path.read_text())
            blob = (self.directory / str(record["tensors_file"])).read_bytes()
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(json_path, f"unreadable: {exc}") from exc
        if hashlib.sha256(blob).hexdigest() != record.get("tensors_sha256"):
            raise CheckpointError(json_path, "tensors file does not match its recorded SHA-256")
        return Checkpoint(step=int(record["step"]), tensors=load_tensors(blob), meta=dict(record["meta"]))

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; None when there is none."""
        errors = []
        for step in reversed(self.steps()):
            try:
                return self.load(step)
            except CheckpointError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return None

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep]:
            for suffix in (".json", ".safetensors"):
                (self.directory / f"ckpt-{step:09d}{suffix}").unlink(missing_ok=True)
