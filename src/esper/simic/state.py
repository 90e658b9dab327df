"""Simic's state directory and the record of one round, without PyTorch: `esper policy show` reads them.

The directory holds the current policy (`policy.safetensors`, payload format), `lineage.jsonl`, one
JSON line per round, and `records.sqlite3`, every decision and field report the learner took off the
bus. Loading the policy itself imports PyTorch, on demand.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esper.leyline import EsperError
from esper.leyline.files import write_atomically
from esper.tamiyo.model.checkpoint import read_payload_header

if TYPE_CHECKING:
    from esper.tamiyo.model.gnn import TamiyoGNNConfig
    from esper.tamiyo.model.policy import GNNPolicy
    from esper.tamiyo.settings import TamiyoSettings


class SimicStateError(EsperError):
    """The state directory holds something Simic cannot continue from."""


@dataclass
class RoundResult:
    """What one round did."""

    mode: str
    published: bool
    parent_version: str
    version: str = ""
    sequence: int = 0
    transitions: int = 0
    samples: int = 0
    on_policy: int = 0
    heuristic: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    finished_at_ns: int = 0
    reports_received: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (NaN figures are written as null: not measured)."""
        data = asdict(self)
        data["metrics"] = {k: (v if math.isfinite(v) else None) for k, v in self.metrics.items()}
        return data


class SimicState:
    """Simic's directory: the current policy (`policy.safetensors`, payload format) and `lineage.jsonl`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.policy_path = root / "policy.safetensors"
        self.lineage_path = root / "lineage.jsonl"
        # Every record taken off the bus (`esper.simic.records.RecordStore`), kept before it is acked.
        self.records_path = root / "records.sqlite3"

    def record(self, result: RoundResult) -> None:
        """Append a round's record."""
        with open(self.lineage_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(result.to_json(), sort_keys=True) + "\n")

    def rounds(self) -> list[dict[str, Any]]:
        """Every round's record, oldest first."""
        if not self.lineage_path.exists():
            return []
        with open(self.lineage_path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def save_policy(self, payload: bytes) -> None:
        """Replace the current policy atomically and durably (the old one stays if the write fails)."""
        write_atomically(self.policy_path, payload)

    def load_policy(
        self, settings: TamiyoSettings, config: TamiyoGNNConfig | None = None
    ) -> tuple[GNNPolicy, int] | None:
        """The saved policy and its sequence, or None when nothing was published yet."""
        if not self.policy_path.exists():
            return None
        payload = self.policy_path.read_bytes()
        header = read_payload_header(payload)
        from esper.tamiyo.model.policy import GNNPolicy

        policy = GNNPolicy(settings, config=config)
        policy.load_state_bytes(payload)
        try:
            sequence = int(header["sequence"])
        except (KeyError, ValueError) as exc:
            raise SimicStateError(f"{self.policy_path} has no lineage sequence in its header") from exc
        return policy, sequence
