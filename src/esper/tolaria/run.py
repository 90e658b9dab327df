"""What a run is started with: its configuration (`config.json`), the bundled tasks and the host each
takes. The run itself is assembled and trained by `esper.assembly.RunAssembly` (the composition root)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from esper.kasmina import KasminaSettings
from esper.leyline import EsperError
from esper.tolaria.checkpoint import CheckpointStore
from esper.tolaria.data import (
    Dataset,
    Layout,
    inspect_npz,
    load_digits,
    load_npz,
    make_signals,
    make_task,
    make_tokens,
)
from esper.tolaria.hosts import HOST_KINDS, Host, build_host
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import check_checkpoint


class RunConfigError(EsperError):
    """A run cannot start with this configuration (or resume from this directory)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run was started with; written to `config.json` and read back on resume."""

    task: str
    host: str
    policy: str
    difficulty: float
    run_dir: Path
    catalogue_path: Path
    training_run_id: str
    tolaria: TolariaSettings
    kasmina: KasminaSettings

    def to_json(self) -> dict[str, Any]:
        """The resolved configuration as JSON."""
        return {
            "task": self.task,
            "host": self.host,
            "policy": self.policy,
            "difficulty": self.difficulty,
            "run_dir": str(self.run_dir),
            "catalogue_path": str(self.catalogue_path),
            "training_run_id": self.training_run_id,
            "tolaria": self.tolaria.model_dump(mode="json"),
            "kasmina": self.kasmina.model_dump(mode="json"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of `to_json`."""
        return cls(
            task=str(data["task"]),
            host=str(data["host"]),
            policy=str(data["policy"]),
            difficulty=float(data["difficulty"]),
            run_dir=Path(data["run_dir"]),
            catalogue_path=Path(data["catalogue_path"]),
            training_run_id=str(data["training_run_id"]),
            tolaria=TolariaSettings(**data["tolaria"]),
            kasmina=KasminaSettings(**data["kasmina"]),
        )


def new_training_run_id() -> str:
    """A fresh run id."""
    return f"run-{uuid.uuid4().hex[:12]}"


GENERATED_TASKS = ("generated", "signals", "tokens")
_LAYOUTS: dict[str, Layout] = {"mlp": "flat", "cnn": "image", "conv1d": "sequence", "transformer": "tokens"}
# Which hosts can take each bundled task.
_TASK_HOSTS: dict[str, tuple[str, ...]] = {
    "digits": ("mlp", "cnn"),
    "generated": ("mlp",),
    "signals": ("conv1d", "mlp"),
    "tokens": ("transformer",),
}


def resolve_host(task: str, host: str) -> tuple[str, str]:
    """The host for `task` and why: `host` itself unless it is "auto", which reads the data's shape.

    Images (digits, or .npz samples [C, H, W] or square [H, W]) get the 2-D CNN, sequences (signals, or
    .npz samples [C, L]) the 1-D CNN, token ids (tokens, or an .npz that declares a `vocab_size`) the
    Transformer, and everything else the MLP. Flat samples [L] go to the MLP even when they are a signal:
    a flat array says nothing about whether its features are ordered (pass --host conv1d when they are).
    """
    if host != "auto":
        if host not in HOST_KINDS:
            raise RunConfigError(f"unknown host {host!r}: use auto or one of {', '.join(HOST_KINDS)}")
        return host, "chosen"
    if task in _TASK_HOSTS:
        chosen = _TASK_HOSTS[task][-1] if task == "digits" else _TASK_HOSTS[task][0]
        return chosen, f"the {task} task's own host"
    if not task.endswith(".npz"):
        raise RunConfigError(
            f"unknown task {task!r}: use digits, {', '.join(GENERATED_TASKS)} or an .npz file"
        )
    shape = inspect_npz(Path(task))
    sample = shape.sample_shape
    if shape.declares_vocab:
        return "transformer", "the file declares a vocab_size: its samples are token ids"
    if len(sample) == 3:
        return "cnn", f"samples {sample} are images [C, H, W]"
    if len(sample) == 2 and sample[0] == sample[1]:
        return "cnn", f"samples {sample} are square: an image [H, W]"
    if len(sample) == 2:
        return "conv1d", f"samples {sample} are sequences [C, L]"
    return "mlp", (
        f"samples {sample} are flat features: a flat array does not say its features are ordered "
        "(--host conv1d treats them as one signal)"
    )


def load_task(task: str, host: str, *, seed: int, difficulty: float) -> Dataset:
    """The dataset for `task` ("digits", "generated", "signals", "tokens" or a path to an .npz file),
    shaped for `host`."""
    if host not in _LAYOUTS:
        raise RunConfigError(f"unknown host {host!r}: use one of {', '.join(HOST_KINDS)}")
    if task in _TASK_HOSTS and host not in _TASK_HOSTS[task]:
        raise RunConfigError(
            f"the {task} task does not fit the {host} host; use --host {' or '.join(_TASK_HOSTS[task])}"
        )
    if task == "digits":
        return load_digits(seed, image=host == "cnn")
    if task == "generated":
        return make_task(difficulty, seed)
    if task == "signals":
        return make_signals(difficulty, seed)
    if task == "tokens":
        return make_tokens(difficulty, seed)
    if task.endswith(".npz"):
        return load_npz(Path(task), seed, layout=_LAYOUTS[host])
    raise RunConfigError(f"unknown task {task!r}: use digits, {', '.join(GENERATED_TASKS)} or an .npz file")


def config_host(config: RunConfig, dataset: Dataset) -> Host:
    """A fresh host of the kind and width `config` names, shaped for `dataset`, on the CPU."""
    return build_host(
        config.host,
        dataset.input_shape,
        dataset.num_classes,
        vocab_size=dataset.vocab_size,
        width=config.tolaria.host_width,
    )


def resolve_config(config: RunConfig, *, resume: bool, path: Path) -> RunConfig:
    """The config to run: `config` for a fresh run, the run directory's own (saved at `path`) on resume.

    On resume the directory given is the run, wherever it lies now: a run directory that was moved keeps
    training where it is (the `run_dir` its config.json recorded is where it was started)."""
    if resume:
        if not path.exists():
            raise RunConfigError(f"cannot resume: {path} does not exist")
        try:
            saved = RunConfig.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunConfigError(f"cannot resume: {path} is not a run configuration: {exc}") from exc
        return replace(saved, run_dir=config.run_dir)
    if path.exists():
        raise RunConfigError(f"{config.run_dir} already holds a run; use --resume or another --run-dir")
    return config


def resume_step(checkpoint_dir: Path) -> int | None:
    """The step a resume continues from: that of the newest checkpoint in `checkpoint_dir` the trainer
    would restore (damaged ones skipped the same way), or None when there is none."""
    store = CheckpointStore(checkpoint_dir)
    checkpoint = store.latest(check=lambda found: check_checkpoint(store.directory, found))
    return None if checkpoint is None else checkpoint.step
