"""The persistence of `SeedManager`: slot and growth state and replay nonces, to and from a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from esper.kasmina.growing import module_key, resize, restore_growth
from esper.kasmina.growth import GrowthNotApplicable
from esper.kasmina.lifecycle import GERMINATED, SeedLifecycle
from esper.kasmina.manager_core import SeedStateRestoreError, _ManagerCore


class _Persistence(_ManagerCore):
    """Exports the manager's state for a checkpoint and rebuilds slots and growths from it."""

    def export_state(self) -> dict[str, Any]:
        """JSON-ready state of every slot (seed weights live in the host's state dict)."""
        slots = {}
        for slot_id, r in self._records.items():
            slots[slot_id] = {
                "lifecycle": r.lifecycle.export_state(),
                "generation": r.generation,
                "seed_id": r.seed_id,
                "blueprint_id": r.blueprint_id,
                "blend_mode": r.blend_mode,
                "blueprint_params": r.blueprint_params,
                "blend_params": r.blend_params,
                "risk": r.risk,
                "seed_gradient_norm": r.seed_gradient_norm,
                "isolation_violations": r.isolation_violations,
                "param_count": r.param_count,
                "has_module": r.slot.seed is not None,
                "stacked": [dict(entry) for entry in r.stacked],
                # What was reported already: a resumed run reports a gate's outcome no second time.
                "last_gate_failure": r.last_gate_failure,
                "ready_reported": r.ready_reported,
            }
        growth = {
            "count": self._growth_count,
            "widths": dict(self._widths),
            "base_widths": dict(self._base_widths),
            "growths": [g.export_state() for g in self._growths.values()],
        }
        return {"paused": self._paused, "slots": slots, "growth": growth}

    def export_nonces(self) -> list[list[Any]]:
        """The nonces of the commands accepted within the replay window, with their expiry (JSON-ready).

        Saved with each checkpoint apart from `export_state` (they are random, the slots' state is not):
        after a restart, a command seen before the checkpoint is still refused as a replay."""
        ledger = self._verifier.ledger
        return [[nonce, expiry] for nonce, expiry in ledger.entries(self._verifier.now())]

    def restore_nonces(self, entries: Sequence[Sequence[Any]]) -> None:
        """Remember the nonces `export_nonces` saved, and those seen since (a rollback forgets none)."""
        try:
            parsed = [(str(nonce), float(expiry)) for nonce, expiry in entries]
        except (TypeError, ValueError) as exc:
            raise SeedStateRestoreError("*", f"saved nonces are not [nonce, expiry] pairs: {exc}") from exc
        self._verifier.ledger.merge(parsed, self._verifier.now())

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Rebuild every slot from `export_state` output: modules are rebuilt empty (load weights next)."""
        self._at_rest = False
        slots = state["slots"]
        if set(slots) != set(self._records):
            raise SeedStateRestoreError(
                ",".join(sorted(set(slots) ^ set(self._records))), "checkpoint slots differ from the host's"
            )
        for slot_id, saved in slots.items():
            record = self._records[slot_id]
            record.slot.remove()
            record.slot.clear_stacked()
            # Absent from checkpoints written before seeds were stacked.
            record.stacked = [dict(entry) for entry in saved.get("stacked", [])]
            for entry in record.stacked:
                if not entry["folded"]:
                    record.slot.stack(
                        self._build_seed(
                            str(entry["blueprint_id"]),
                            record.slot,
                            int(entry["blend_mode"]),
                            {k: float(v) for k, v in entry["blueprint_params"].items()},
                            {k: float(v) for k, v in entry["blend_params"].items()},
                            checked=False,
                        )
                    )
            record.lifecycle = SeedLifecycle.from_state(self.settings, saved["lifecycle"])
            record.generation = int(saved["generation"])
            record.seed_id = str(saved["seed_id"])
            record.blueprint_id = str(saved["blueprint_id"])
            record.blend_mode = int(saved["blend_mode"])
            record.blueprint_params = {k: float(v) for k, v in saved["blueprint_params"].items()}
            record.blend_params = {k: float(v) for k, v in saved["blend_params"].items()}
            record.risk = float(saved["risk"])
            norm = saved["seed_gradient_norm"]
            record.seed_gradient_norm = None if norm is None else float(norm)
            record.isolation_violations = int(saved["isolation_violations"])
            record.isolation_reported = 0
            record.param_count = int(saved["param_count"])
            # Absent from checkpoints written before the reporting memory was saved.
            record.last_gate_failure = str(saved.get("last_gate_failure", ""))
            record.ready_reported = bool(saved.get("ready_reported", False))
            if saved["has_module"]:
                seed = self._build_seed(
                    record.blueprint_id,
                    record.slot,
                    record.blend_mode,
                    record.blueprint_params,
                    record.blend_params,
                    checked=False,
                )
                record.slot.install(seed)
                if record.lifecycle.stage == GERMINATED and record.lifecycle.sanity_ok is not None:
                    record.slot.sanity = (record.lifecycle.sanity_ok, record.lifecycle.sanity_reason)
            self._sync_slot(record)
        self._restore_growth(state.get("growth"))
        self._paused = bool(state["paused"])
        self._added.clear()
        self._retired.clear()
        self._merged.clear()
        self._events.clear()

    def _restore_growth(self, saved: Mapping[str, Any] | None) -> None:
        """Take every growth out, give widened layers their saved widths, rebuild the saved growths."""
        for growth in self._growths.values():
            growth.remove()
            self._unregister(growth)
        self._growths = {}
        saved = saved or {"count": 0, "widths": {}, "base_widths": {}, "growths": []}
        if (saved["growths"] or saved["widths"]) and self._host is None:
            raise SeedStateRestoreError("*", "the checkpoint holds growths and this manager has no host")
        for layer_id, width in saved["base_widths"].items():
            self._base_widths.setdefault(str(layer_id), int(width))
        self._widths = {str(k): int(v) for k, v in saved["widths"].items()}
        host = self._host
        try:
            for layer_id, base in self._base_widths.items():
                assert host is not None
                resize(host, layer_id, self._widths.get(layer_id, base))
            for entry in saved["growths"]:
                assert host is not None
                growth = restore_growth(host, self._growth_settings, entry)
                self._growths[growth.growth_id] = growth
                if growth.module is not None:
                    assert self._container is not None
                    self._container[module_key(growth.growth_id)] = growth.module
        except GrowthNotApplicable as exc:
            raise SeedStateRestoreError("*", f"growth cannot be restored: {exc}") from exc
        self._growth_count = int(saved["count"])
