"""`esper.GrowthSession`: Esper grows a model inside a user's own training loop.

The user keeps their loop, their data and their optimizer; after each optimizer step they call
`session.step(loss)`. The session is a run like any other, built by `esper.assembly.RunAssembly`: at its
cadence the trainer evaluates on the validation data, Tamiyo decides, Kasmina applies the command, and
the changed parameters reach the user's optimizer without losing its state (a seed's parameters become
a new parameter group; a widened tensor keeps its moments, extended with zeros for the new units; a
culled seed's group is removed). The run directory is a normal one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from esper.api.grow import GrowthResult, api_command, run_config, save_final_model
from esper.api.inputs import GrowInputError, check_split, default_loss, read_split, to_dataset
from esper.assembly import RunAssembly, RunInputs, RunSummary
from esper.leyline import EsperError, resolve_signing_secret
from esper.tolaria.adapt import adapt_model
from esper.tolaria.optimizer import GroupedAdam
from esper.tolaria.trainer import Trainer

_UNKNOWN_LENGTH = 2**62
"""Steps a session counts its run as when the loop's length is not given."""


class SessionClosed(EsperError):
    """The session has ended: it takes no more steps."""


class GrowthSession:
    """Growth for a training loop you keep. Use it as a context manager, or call `close()`:

        with esper.GrowthSession(model, optimizer, val_loader, loss_fn=loss_fn) as session:
            for x, y in train_loader:
                loss = loss_fn(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                session.step(loss)
        result = session.result

    `model` is adapted in place (growth points found or marked, as `esper.grow` does) and keeps
    training through your own calls; `optimizer` must hold all its parameters (any `torch.optim`
    optimizer). Every `decision_interval` steps the session evaluates on `val_data` (a DataLoader or
    `(inputs, targets)` tensors, checked through the model and `loss_fn` first) and applies the
    controller's decision. `steps_per_epoch` (say `len(train_loader)`) sets how many steps the lifecycle
    counts as an epoch (by default one decision interval); with `epochs`, the length of your loop, the
    controller starts no growth that could not finish before its end. The controller may also scale
    the learning rate of every group of your optimizer (an optimizer command). Other arguments as
    `esper.grow`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        val_data: Any,
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        decision_interval: int = 50,
        steps_per_epoch: int | None = None,
        epochs: int | None = None,
        max_params: int | None = None,
        policy: str | Path = "heuristic",
        run_dir: str | Path | None = None,
        batch_size: int | None = None,
        name: str | None = None,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        loss = loss_fn if loss_fn is not None else default_loss()
        val = read_split(val_data, "val_data")
        batch = batch_size or val.batch_size or 64
        classification = check_split(model, loss, val, "val_data", batch)
        optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in optimised]
        if missing:
            raise GrowInputError(
                "optimizer", f"it does not hold the model's parameters {missing[:5]}; give it all of them"
            )
        task_name = name or f"{type(model).__name__} (esper.GrowthSession)"
        dataset = to_dataset(task_name, val, val, classification=classification)
        run_settings, config = run_config(
            task_name,
            policy=policy,
            run_dir=run_dir,
            settings=settings,
            tolaria={
                "epochs": epochs or 1,
                "batch_size": batch,
                "max_params": max_params or 0,
                "decision_interval": decision_interval,
            },
        )
        self.host = adapt_model(model, val.x[:batch])
        self.model = model
        self.run_dir = config.run_dir
        self._classification = classification
        self._stack = contextlib.ExitStack()
        # The run's preparation seeds torch and sets its thread count: the user's process keeps its own.
        threads, rng = torch.get_num_threads(), torch.get_rng_state()
        try:
            run = self._stack.enter_context(
                RunAssembly(
                    run_settings,
                    config,
                    secret=resolve_signing_secret(run_settings.esper),
                    inputs=RunInputs(dataset, host=self.host, loss=loss),
                    command=api_command("esper.GrowthSession"),
                )
            )
            self._drive = self._stack.enter_context(run.driven())
            trainer = self._drive.trainer
            trainer.optimizer = GroupedAdam.wrapping(optimizer)
            trainer.steps_per_epoch = steps_per_epoch or decision_interval
            # The share of the run done, which tells the controller when a growth could no longer finish
            # before the end; a loop of unknown length is never near its end.
            trainer.total_steps = trainer.steps_per_epoch * epochs if epochs else _UNKNOWN_LENGTH
            trainer.save_checkpoint()  # the run's first checkpoint, as Esper's own loop writes it
        except BaseException as exc:
            self._stack.__exit__(type(exc), exc, exc.__traceback__)
            raise
        finally:
            torch.set_num_threads(threads)
            torch.set_rng_state(rng)
        self._trainer: Trainer | None = trainer
        self.result: GrowthResult | None = None

    @property
    def steps(self) -> int:
        """Optimizer steps the session has seen."""
        return self._live().step

    def _live(self) -> Trainer:
        if self._trainer is None:
            raise SessionClosed("the growth session is closed")
        return self._trainer

    def step(self, loss: Tensor | float) -> None:
        """Call after each `optimizer.step()` (before the gradients are cleared) with that step's loss."""
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        self._live().external_step(value)

    def close(self) -> RunSummary:
        """End the run: open lifecycles end (what was not fossilised is taken out), the final model is
        evaluated and saved in the run directory; returns the summary (also `self.result`)."""
        trainer = self._live()
        self._trainer = None
        with self._stack:
            trainer.collect_decision()
            trainer.save_checkpoint()
            summary = self._drive.conclude(trainer.finish())
        result = GrowthResult(
            model=self.model,
            host=self.host,
            summary=summary,
            run_dir=self.run_dir,
            task="classification" if self._classification else "other",
        )
        self.result = result
        save_final_model(result)
        return summary

    def __enter__(self) -> GrowthSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._trainer is None:
            return
        if exc is None:
            self.close()
            return
        self._trainer = None
        self._stack.__exit__(exc_type, exc, tb)  # the run is marked failed (or halted) with the reason


__all__ = ["GrowthSession", "SessionClosed"]
