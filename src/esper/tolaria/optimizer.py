"""The trainer's optimizer with one parameter group per owner: the host, and each seed by its id.

Seeds come and go while training; adding a group or retiring one leaves every other parameter's state
(Adam moments and step counts) untouched. The state round-trips through tensors + JSON, never pickle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from esper.leyline import EsperError

HOST_GROUP = "host"


class OptimizerStateError(EsperError):
    """Saved optimizer state does not fit the parameters it is restored onto."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"optimizer state cannot be restored: {reason}")


class GroupedAdam:
    """Adam over named parameter groups that can be added and retired while training."""

    def __init__(
        self, host_parameters: Iterable[nn.Parameter], *, lr: float, weight_decay: float = 0.0
    ) -> None:
        self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
            [{"params": list(host_parameters), "name": HOST_GROUP}], lr=lr, weight_decay=weight_decay
        )

    @classmethod
    def wrapping(cls, optimizer: torch.optim.Optimizer) -> GroupedAdam:
        """The same named-group bookkeeping over a caller's own optimizer (any `torch.optim` class),
        which keeps training the model's parameters: its first group is named the host group, further
        ones `host.<i>`; seeds' groups are added to it, widened tensors' state extended in it."""
        if not optimizer.param_groups:
            raise OptimizerStateError("the optimizer has no parameter group")
        for index, group in enumerate(optimizer.param_groups):
            group.setdefault("name", HOST_GROUP if index == 0 else f"{HOST_GROUP}.{index}")
        wrapped = cls.__new__(cls)
        wrapped.optimizer = optimizer
        return wrapped

    @property
    def group_names(self) -> list[str]:
        """Group names in order."""
        return [str(group["name"]) for group in self.optimizer.param_groups]

    @property
    def lr(self) -> float:
        """The learning rate of the host group (every group shares it)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every group."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def holds(self, parameter: nn.Parameter) -> bool:
        """True when `parameter` is optimised."""
        return any(parameter is p for group in self.optimizer.param_groups for p in group["params"])

    def add_group(self, name: str, parameters: Sequence[nn.Parameter]) -> None:
        """Start optimising `parameters` under `name` (a seed id) at the current learning rate."""
        if name in self.group_names:
            raise ValueError(f"optimizer group {name!r} already exists")
        self.optimizer.add_param_group({"params": list(parameters), "name": name, "lr": self.lr})

    def retire_group(self, name: str) -> None:
        """Stop optimising the group `name` and forget its state; other groups keep theirs."""
        for index, group in enumerate(self.optimizer.param_groups):
            if group["name"] == name:
                for parameter in group["params"]:
                    self.optimizer.state.pop(parameter, None)
                del self.optimizer.param_groups[index]
                return
        raise KeyError(f"no optimizer group {name!r}; groups are {self.group_names}")

    def absorb(self, old: nn.Parameter, appended: nn.Parameter, merged: nn.Parameter, *, dim: int) -> None:
        """`merged` (`old` and `appended` concatenated along `dim`) takes `old`'s place and moments.

        Every per-element state of `old` (exp_avg, exp_avg_sq, max_exp_avg_sq) is extended along `dim`:
        the old entries are copied; the new ones come from `appended`'s own state when the optimizer held
        it (then `appended` leaves its group), else they are zeros. The step count is `old`'s. When
        `appended` took a different number of steps, its moments are rescaled so that their
        bias-corrected values are kept under `old`'s step count; with equal counts they are copied as is.
        A parameter that never stepped has no state, and `merged` starts without state too.
        """
        place = self._locate(old)
        if place is None:
            raise OptimizerStateError("the parameter to extend is not optimised")
        expected = torch.cat([old.detach(), appended.detach()], dim=dim).shape
        if merged.shape != expected:
            raise OptimizerStateError(f"merged shape {tuple(merged.shape)} is not {tuple(expected)}")
        old_state = self.optimizer.state.pop(old, {})
        appended_place = self._locate(appended)
        appended_state = self.optimizer.state.pop(appended, {})
        appended_betas = (0.9, 0.999)
        if appended_place is not None:
            group = self.optimizer.param_groups[appended_place[0]]
            appended_betas = group.get("betas", appended_betas)
            del group["params"][appended_place[1]]
        # Removing `appended` may have shifted `old` within a shared group: find it again.
        located = self._locate(old)
        assert located is not None
        group_index, index = located
        self.optimizer.param_groups[group_index]["params"][index] = merged
        if not old_state:
            return
        scale = _bias_correction_ratios(old_state, appended_state, appended_betas)
        state: dict[str, Any] = {}
        for key, value in old_state.items():
            if isinstance(value, Tensor) and value.shape == old.shape:
                extra = appended_state.get(key)
                if extra is None:
                    extra = torch.zeros_like(appended, memory_format=torch.contiguous_format)
                elif scale.get(key, 1.0) != 1.0:
                    extra = extra * scale[key]
                state[key] = torch.cat([value, extra.to(value.device, value.dtype)], dim=dim)
            else:
                state[key] = value.clone() if isinstance(value, Tensor) else value
        self.optimizer.state[merged] = state

    def _locate(self, parameter: nn.Parameter) -> tuple[int, int] | None:
        for group_index, group in enumerate(self.optimizer.param_groups):
            for index, candidate in enumerate(group["params"]):
                if candidate is parameter:
                    return group_index, index
        return None

    def step(self) -> None:
        """One optimizer step."""
        self.optimizer.step()

    def zero_grad(self) -> None:
        """Clear every gradient (as `zero_grad(set_to_none=True)` does, without its profiler scope)."""
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None

    # -- persistence ----------------------------------------------------------------------------------------

    def export_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, JSON) of the optimizer: per-parameter moments, group layout and hyperparameters."""
        state = self.optimizer.state_dict()
        tensors: dict[str, Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for index, entry in state["state"].items():
            for key, value in entry.items():
                if isinstance(value, Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().clone().contiguous()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        groups = [{k: v for k, v in group.items()} for group in state["param_groups"]]
        return tensors, {"param_groups": groups, "scalars": scalars}

    def restore_state(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Load state exported by `export_state` onto groups already created in the same order."""
        groups = meta["param_groups"]
        names = [str(group["name"]) for group in groups]
        if names != self.group_names:
            raise OptimizerStateError(f"saved groups {names} differ from current {self.group_names}")
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value.clone()
        for index, entry in meta["scalars"].items():
            state.setdefault(int(index), {}).update(entry)
        try:
            self.optimizer.load_state_dict({"state": state, "param_groups": [dict(g) for g in groups]})
        except (ValueError, KeyError) as exc:
            raise OptimizerStateError(str(exc)) from exc


def _bias_correction_ratios(
    old_state: Mapping[str, Any], appended_state: Mapping[str, Any], betas: tuple[float, float]
) -> dict[str, float]:
    """Factors that keep the appended moments' bias-corrected values under the old step count."""
    if "step" not in old_state or "step" not in appended_state:
        return {}
    old_steps, appended_steps = float(old_state["step"]), float(appended_state["step"])
    if appended_steps in {old_steps, 0.0}:
        return {}
    beta1, beta2 = betas
    first = (1.0 - beta1**old_steps) / (1.0 - beta1**appended_steps)
    second = (1.0 - beta2**old_steps) / (1.0 - beta2**appended_steps)
    return {"exp_avg": first, "exp_avg_sq": second, "max_exp_avg_sq": second}
