"""Growth steps of a run: what each growth did to the model's size and validation accuracy.

A growth step is one growth that started in the run: a WIDEN or DEEPEN (Kasmina names it
`<layer>:<w|d><n>` and reports it under that id), or a seed germinated in a slot. It is read from the run's
records after the fact, so a resumed run reads the same as an uninterrupted one:

- `step`: when it started (its GERMINATED transition); `end_step`: when it ended, if it did;
- `outcome`: the stage it ended in (FOSSILIZED: it became part of the host; CULLED; TERMINATED at the
  end of the run), or the stage it was in when the run ended;
- `params_before`, `accuracy_before`: the model at the last evaluation at or before `step`;
- `params_after`, `accuracy_after`: the model at the first evaluation after `end_step` (the final
  evaluation when none came between; for a growth still on its way, the final one).

Between `before` and `after` the host also trained, so the difference is what the run gained while the
growth was made, not the growth's contribution alone (that is the counterfactual Kasmina measures).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

_ENDS = frozenset({"FOSSILIZED", "CULLED", "TERMINATED"})


def _operation(event: Mapping[str, Any]) -> tuple[str, str]:
    """(operation, target) of a growth's GERMINATED transition."""
    detail = event.get("detail") or {}
    if "growth" in detail:
        return str(detail["growth"]), str(detail.get("layer_id", ""))
    reason = str(event.get("reason", ""))  # a seed: "blueprint <id>, <n> parameters"
    blueprint = reason.removeprefix("blueprint ").split(",", 1)[0] if reason.startswith("blueprint ") else ""
    return f"seed {blueprint}".strip(), str(event.get("slot_id", ""))


def growth_steps(
    events: Iterable[Mapping[str, Any]], metrics: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One record per growth started in the run, in the order they started (see the module doc)."""
    evaluations = sorted(
        (
            (int(m["step"]), bool(m.get("final")), float(m["validation_accuracy"]), int(m["parameters"]))
            for m in metrics
            if m.get("parameters") is not None and m.get("validation_accuracy") is not None
        ),
        key=lambda e: (e[0], e[1]),
    )
    steps: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.get("kind") != "transition":
            continue
        key = str(event.get("seed_id", ""))
        to_stage = str(event.get("to_stage", ""))
        if to_stage == "GERMINATED":
            operation, target = _operation(event)
            steps[key] = {
                "step": int(event["step"]),
                "operation": operation,
                "target": target,
                "growth_id": key,
                "outcome": to_stage,
                "end_step": None,
            }
        elif key in steps and steps[key]["end_step"] is None:
            steps[key]["outcome"] = to_stage
            if to_stage in _ENDS:
                steps[key]["end_step"] = int(event["step"])
    records = []
    for entry in steps.values():
        before = [e for e in evaluations if e[0] <= entry["step"] and not e[1]]
        end = entry["end_step"]
        after = [e for e in evaluations if end is not None and e[0] > end and not e[1]]
        finals = [e for e in evaluations if e[1]] or evaluations[-1:]
        chosen_before = before[-1] if before else (evaluations[0] if evaluations else None)
        chosen_after = after[0] if after else (finals[-1] if finals else None)
        records.append(
            {
                **entry,
                "params_before": None if chosen_before is None else chosen_before[3],
                "params_after": None if chosen_after is None else chosen_after[3],
                "accuracy_before": None if chosen_before is None else chosen_before[2],
                "accuracy_after": None if chosen_after is None else chosen_after[2],
            }
        )
    return records


class GrowthLog:
    """What `growth_steps` needs, gathered as the run goes: the lifecycle transitions and each
    evaluation's (step, final, accuracy, parameters). Kept in checkpoints, so the summary of a resumed run
    needs no second read of the run's logs."""

    def __init__(self) -> None:
        self.transitions: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []

    def transition(self, record: Mapping[str, Any]) -> None:
        self.transitions.append(
            {
                key: record[key]
                for key in ("kind", "step", "seed_id", "slot_id", "to_stage", "reason", "detail")
                if key in record
            }
        )

    def evaluation(self, step: int, *, final: bool, accuracy: float, parameters: int) -> None:
        self.evaluations.append(
            {"step": step, "final": final, "validation_accuracy": accuracy, "parameters": parameters}
        )

    def steps(self) -> list[dict[str, Any]]:
        return growth_steps(self.transitions, self.evaluations)

    def state(self) -> dict[str, Any]:
        return {"transitions": list(self.transitions), "evaluations": list(self.evaluations)}

    @classmethod
    def restored(cls, state: Mapping[str, Any] | None) -> GrowthLog:
        log = cls()
        if state:
            log.transitions = list(state["transitions"])
            log.evaluations = list(state["evaluations"])
        return log
