"""Policy-update intake (P3): verify, validate, load into a candidate, swap in one step, roll back.

An update is checked in this order, cheapest and least trusting first: contract (required fields),
signature, freshness and replay (`SignatureVerifier`), version strictly newer than the serving one
(`sequence`), architecture and registry compatibility, payload hash, payload format (safetensors only: a
pickle is refused before anything reads it), the lineage written in the payload's own header, and finally
loading the weights into a *candidate* policy that shares the serving policy's graph builder. The
candidate must produce finite outputs on a probe graph; only then does the service swap it in, between two
decisions, in one assignment.

After a swap the new policy is on probation for its first `update_probation_decisions` decisions: a
decision that fails (an inference error, or a miss of the hard inference deadline) counts against it, and
`update_probation_max_failures` of them roll the service back to the previous policy. (A decision whose
signing and bookkeeping ran past the budget after a timely inference is the service's `step_over_budget`
warning, not the policy's failure.) Accepted weights can be archived (durably, before they serve), so a
resumed run restores them. Every rejection and every rollback is an event with its reason and a metric
(`tamiyo_policy_updates`).

A sequence may move at most `update_max_sequence_step` past the newest accepted one: a signed update with
an absurd sequence would otherwise make every later update look old. On the bus, an update is acked only
after it was offered, and a bus that cannot be reached is an outage of the feed, never of the decisions:
one `policy_feed_unavailable` event, the serving policy goes on deciding, and one `policy_feed_recovered`
when the feed can be read again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from prometheus_client import Counter, Gauge

from esper.leyline import (
    SYSTEM_CLOCK,
    Clock,
    ContractViolation,
    EsperError,
    MalformedMessage,
    SignatureError,
    SignatureVerifier,
    parse,
    pb,
    validate_policy_update,
)
from esper.leyline.files import write_atomically
from esper.oona import BusError
from esper.tamiyo.model.checkpoint import CheckpointIncompatible, PolicyUpdateRejected, read_payload_header
from esper.tamiyo.model.gnn import ARCHITECTURE_VERSION, TamiyoGNNConfig
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.model.proposal import Policy
from esper.tamiyo.model.schema import TAMIYO_SCHEMA
from esper.tamiyo.model.weights import policy_registry_digest
from esper.tamiyo.runtime.service import TamiyoService
from esper.tamiyo.runtime.update_feed import PolicyUpdateFeed
from esper.tamiyo.settings import TamiyoSettings


class PolicyLineage(Protocol):
    """Where the succession of serving versions is recorded (Tamiyo's store implements it)."""

    def record_policy_version(self, version: str, source: str) -> bool:
        """Make `version` current; False if it already is."""
        ...


@dataclass(frozen=True)
class ServingPolicy:
    """What is deciding now and where it came from."""

    version: str
    sequence: int
    parent_version: str = ""
    policy_id: str = ""


@dataclass
class _Probation:
    previous: Policy
    previous_serving: ServingPolicy
    remaining: int
    failures: list[str] = field(default_factory=list)


Candidate = Callable[[Policy], GNNPolicy]


class PolicyUpdateIntake:
    """Policy updates for one `TamiyoService`, swapped in transactionally (P3).

    An input of the service, whatever its policy: constructing an intake attaches it (`consult`), and the
    service polls it before each decision (outside the decision's deadline) and reports each outcome to it
    (the probation of a fresh policy). The service is the controller; this is not a second front door.
    """

    def __init__(
        self,
        service: TamiyoService,
        policy: Policy,
        secret: bytes,
        settings: TamiyoSettings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        feed: PolicyUpdateFeed | None = None,
        sequence: int = 0,
        config: TamiyoGNNConfig | None = None,
        clock_skew_s: float = 5.0,
        archive: Path | None = None,
        lineage: PolicyLineage | None = None,
    ) -> None:
        self._service = service
        self._archive = archive
        self._lineage = lineage
        self._policy = policy  # the policy the service decides with (swapped together with it)
        self._settings = settings
        self._clock = clock
        self._feed = feed
        self._config = config or TamiyoGNNConfig.sized(settings.policy_size, TAMIYO_SCHEMA)
        self._verifier = SignatureVerifier(
            secret, freshness_s=settings.update_freshness_s, future_skew_s=clock_skew_s, clock=clock
        )
        self.serving = ServingPolicy(version=service.policy_version, sequence=sequence)
        # The highest sequence ever accepted: a rolled-back update is not taken again.
        self._watermark = sequence
        self._probation: _Probation | None = None
        registry = service.telemetry.registry
        self.updates = Counter(
            "tamiyo_policy_updates",
            "Policy updates by outcome (accepted, rejected, rolled_back) and reason",
            ["outcome", "reason"],
            registry=registry,
        )
        self.sequence_gauge = Gauge(
            "tamiyo_policy_sequence", "Sequence of the policy deciding now", registry=registry
        )
        self.sequence_gauge.set(sequence)
        self.feed_up = Gauge(
            "tamiyo_policy_feed_up",
            "1 while the policy-update feed is reachable (or there is none), 0 during an outage",
            registry=registry,
        )
        self.feed_up.set(1)
        self.feed_failures = Counter(
            "tamiyo_policy_feed_failures",
            "Bus operations of the policy-update feed that failed (fetch or ack)",
            ["operation"],
            registry=registry,
        )
        self._feed_outage = ""  # why the feed cannot be read, while it cannot (announced once)
        service.consult(self)  # the service polls this intake between its decisions

    @property
    def policy(self) -> Policy:
        """The policy deciding now."""
        return self._policy

    @property
    def on_probation(self) -> bool:
        """True while a freshly swapped-in policy is still being watched."""
        return self._probation is not None

    # -- intake -------------------------------------------------------------------------------------

    def offer(self, update: pb.PolicyUpdate) -> ServingPolicy:
        """Check `update`, load it into a candidate and swap it in; `PolicyUpdateRejected` otherwise.

        The serving policy is untouched by a rejection. Every outcome is an event and a metric.
        """
        try:
            candidate = self._candidate(update)
            self._archive_payload(candidate.version, bytes(update.payload), int(update.sequence))
        except PolicyUpdateRejected as exc:
            self._reject(exc)
            raise
        previous = self._service.swap_policy(candidate)
        self._policy = candidate
        previous_serving = self.serving
        self.serving = ServingPolicy(
            version=candidate.version,
            sequence=update.sequence,
            parent_version=update.parent_version,
            policy_id=update.policy_id,
        )
        self._watermark = update.sequence
        self._remember(candidate.version, f"policy update {update.sequence}")
        self._probation = _Probation(
            previous=previous,
            previous_serving=previous_serving,
            remaining=self._settings.update_probation_decisions,
        )
        self.updates.labels(outcome="accepted", reason="ok").inc()
        self.sequence_gauge.set(update.sequence)
        self._service.telemetry.metric("tamiyo.policy.sequence", float(update.sequence))
        self._service.telemetry.emit(
            "policy_update_accepted",
            f"policy {candidate.version} (sequence {update.sequence}, parent {update.parent_version or '-'}) "
            f"replaces {previous_serving.version}",
            version=candidate.version,
            sequence=str(update.sequence),
            previous=previous_serving.version,
        )
        return self.serving

    def offer_bytes(self, data: bytes) -> ServingPolicy:
        """`offer` for an update still in its wire form (a malformed one is rejected with a reason)."""
        try:
            update = parse(pb.PolicyUpdate, data)
        except MalformedMessage as exc:
            rejected = PolicyUpdateRejected("malformed", exc.reason)
            self._reject(rejected)
            raise rejected from exc
        return self.offer(update)

    def _candidate(self, update: pb.PolicyUpdate) -> GNNPolicy:  # noqa: C901 (each check an update must pass, in order, refused with its own reason)
        version, sequence = update.tamiyo_policy_version, int(update.sequence)

        def rejected(reason: str, detail: str) -> PolicyUpdateRejected:
            return PolicyUpdateRejected(reason, detail, version=version, sequence=sequence)

        try:
            validate_policy_update(update)
        except ContractViolation as exc:
            raise rejected("malformed", str(exc)) from exc
        try:
            self._verifier.verify(update)
        except SignatureError as exc:
            raise rejected(exc.reason, exc.detail) from exc
        if sequence <= self._watermark:
            raise rejected("not_newer", f"sequence {sequence} is not newer than {self._watermark}")
        step = self._settings.update_max_sequence_step
        if sequence - self._watermark > step:
            # Accepted, such a sequence would make every later update "not newer".
            raise rejected(
                "sequence_jump",
                f"sequence {sequence} is more than {step} past {self._watermark} "
                "(TAMIYO_UPDATE_MAX_SEQUENCE_STEP)",
            )
        if version == self.serving.version:
            raise rejected("not_newer", f"version {version} is already serving")
        if update.architecture_version != ARCHITECTURE_VERSION:
            raise rejected(
                "architecture_mismatch",
                f"update is for {update.architecture_version!r}, this Tamiyo runs {ARCHITECTURE_VERSION!r}",
            )
        expected_registry = policy_registry_digest(self._config)
        if update.registry_digest != expected_registry:
            raise rejected(
                "registry_mismatch",
                f"registry digest {update.registry_digest!r}, this Tamiyo has {expected_registry!r}",
            )
        digest = hashlib.sha256(update.payload).hexdigest()
        if digest != update.payload_sha256:
            raise rejected("payload_hash_mismatch", f"payload hashes to {digest}, update says so differently")
        try:
            header = read_payload_header(update.payload)
        except PolicyUpdateRejected as exc:
            raise rejected(exc.reason, exc.detail) from exc
        claimed = {
            "tamiyo_policy_version": version,
            "parent_version": update.parent_version,
            "sequence": str(sequence),
            "registry_digest": update.registry_digest,
        }
        for key, value in claimed.items():
            if header.get(key) != value:
                raise rejected(
                    "header_mismatch", f"payload header {key}={header.get(key)!r}, update {value!r}"
                )
        candidate = self._new_candidate()
        try:
            candidate.load_state_bytes(bytes(update.payload))
        except CheckpointIncompatible as exc:
            # A header of another architecture, or tensors that do not fit this one (damaged weights).
            kind = "architecture_mismatch" if exc.field in candidate.config.header() else "load_failed"
            raise rejected(kind, str(exc)) from exc
        except Exception as exc:  # any failure to load is a rejection with its reason
            raise rejected("load_failed", f"{type(exc).__name__}: {exc}") from exc
        if candidate.version != version:
            raise rejected("version_mismatch", f"weights are {candidate.version}, update claims {version}")
        self._check_candidate(candidate, rejected)
        return candidate

    def _new_candidate(self) -> GNNPolicy:
        serving = self._policy
        if isinstance(serving, GNNPolicy):
            return GNNPolicy(self._settings, config=serving.config, builder=serving.builder)
        return GNNPolicy(self._settings, config=self._config)

    @staticmethod
    def _check_candidate(candidate: GNNPolicy, rejected: Callable[[str, str], PolicyUpdateRejected]) -> None:
        try:
            candidate.warm_up()
            if not all(bool(torch.isfinite(p).all()) for p in candidate.module.parameters()):
                raise rejected("candidate_invalid", "weights are not finite")
        except PolicyUpdateRejected:
            raise
        except Exception as exc:  # a candidate that cannot run is rejected, never swapped in
            raise rejected("candidate_invalid", f"probe run failed: {type(exc).__name__}: {exc}") from exc

    def _reject(self, exc: PolicyUpdateRejected) -> None:
        self.updates.labels(outcome="rejected", reason=exc.reason).inc()
        self._service.telemetry.emit(
            "policy_update_rejected",
            exc.detail,
            reason=exc.reason,
            version=exc.version,
            sequence=str(exc.sequence),
            serving=self.serving.version,
        )

    # -- deciding, probation and rollback ----------------------------------------------------------

    def poll(self) -> list[ServingPolicy | PolicyUpdateRejected]:
        """Take every update waiting on the feed; each is accepted or rejected (never raised here).

        Each update is acknowledged on the bus only once it has been offered: one still unoffered when
        something goes wrong stays pending and is offered at a later poll. A feed that cannot reach the
        bus is an outage: announced once (`policy_feed_unavailable`), decisions go on with the policy
        serving now, and the first poll that reaches the bus again announces `policy_feed_recovered`.
        """
        feed = self._feed
        if feed is None:
            return []
        try:
            fetched = feed.fetch()
        except BusError as exc:
            self._feed_failed("fetch", exc)
            return []
        # Newest first: a Tamiyo that fell behind jumps to the latest valid update in one swap.
        fetched.sort(key=lambda item: item.order)
        outcomes: list[ServingPolicy | PolicyUpdateRejected] = []
        offered: list[str] = []
        try:
            for item in fetched:
                offered.append(item.message_id)
                if isinstance(item.update, PolicyUpdateRejected):
                    self._reject(item.update)
                    outcomes.append(item.update)
                    continue
                try:
                    outcomes.append(self.offer(item.update))
                except PolicyUpdateRejected as exc:
                    outcomes.append(exc)
        finally:
            self._acknowledge(feed, offered)
        return outcomes

    def _acknowledge(self, feed: PolicyUpdateFeed, message_ids: list[str]) -> None:
        try:
            feed.ack(message_ids)
        except BusError as exc:
            self._feed_failed("ack", exc)  # the feed fetches them again (and they are refused as seen)
            return
        self._feed_recovered()

    def _feed_failed(self, operation: str, exc: BusError) -> None:
        self.feed_failures.labels(operation=operation).inc()
        self.feed_up.set(0)
        if self._feed_outage:
            return
        self._feed_outage = f"{type(exc).__name__}: {exc}"
        self._service.telemetry.emit(
            "policy_feed_unavailable",
            f"policy updates cannot be read ({self._feed_outage}); {self.serving.version} keeps deciding",
            operation=operation,
            error=type(exc).__name__,
            serving=self.serving.version,
        )

    def _feed_recovered(self) -> None:
        if not self._feed_outage:
            return
        outage, self._feed_outage = self._feed_outage, ""
        self.feed_up.set(1)
        self._service.telemetry.emit(
            "policy_feed_recovered",
            f"policy updates can be read again (after {outage})",
            serving=self.serving.version,
        )

    def between_decisions(self) -> bool:
        """Poll the feed (the service calls it before each decision): True when a new policy was swapped
        in."""
        return any(isinstance(outcome, ServingPolicy) for outcome in self.poll())

    def judge(self, failure: str) -> None:
        """One decision's outcome ("" for a success): a policy on probation that failed too often is rolled
        back."""
        probation = self._probation
        if probation is None:
            return
        if failure:
            probation.failures.append(failure)
        probation.remaining -= 1
        if len(probation.failures) >= self._settings.update_probation_max_failures:
            self.rollback("; ".join(probation.failures))
        elif probation.remaining <= 0:
            self._probation = None

    def rollback(self, reason: str) -> ServingPolicy:
        """Put the policy that served before the last swap back (an event and a metric)."""
        probation = self._probation
        if probation is None:
            raise EsperError("no swapped-in policy to roll back")
        failed = self.serving
        self._service.swap_policy(probation.previous)
        self._policy = probation.previous
        self.serving = probation.previous_serving
        self._remember(self.serving.version, f"rollback from {failed.version}")
        self._probation = None
        self.updates.labels(outcome="rolled_back", reason="probation_failed").inc()
        self.sequence_gauge.set(self.serving.sequence)
        self._service.telemetry.emit(
            "policy_rolled_back",
            f"policy {failed.version} (sequence {failed.sequence}) failed its probation: {reason}; "
            f"{self.serving.version} serves again",
            version=failed.version,
            sequence=str(failed.sequence),
            restored=self.serving.version,
            reason=reason,
        )
        return self.serving

    def _archive_payload(self, version: str, payload: bytes, sequence: int) -> None:
        """Keep accepted weights in the archive, durably, before they serve (a resumed run loads them from
        there); an update whose weights cannot be archived is refused."""
        if self._archive is None:
            return
        try:
            self._archive.mkdir(parents=True, exist_ok=True)
            write_atomically(self._archive / f"{version}.safetensors", payload)
        except OSError as exc:
            raise PolicyUpdateRejected(
                "archive_failed",
                f"weights cannot be archived in {self._archive}: {exc}",
                version=version,
                sequence=sequence,
            ) from exc

    def _remember(self, version: str, source: str) -> None:
        """Extend the lineage with the version serving now."""
        if self._lineage is not None:
            self._lineage.record_policy_version(version, source)

    def export_state(self) -> dict[str, Any]:
        """The serving policy's run state plus the lineage (saved with the trainer's checkpoints)."""
        return {
            "policy": self._policy.state(),
            "serving": {
                "version": self.serving.version,
                "sequence": self.serving.sequence,
                "parent_version": self.serving.parent_version,
                "policy_id": self.serving.policy_id,
            },
            "watermark": self._watermark,
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Continue from `export_state()`.

        A resumed run (a fresh process still on older weights) gets the checkpoint's weights back from the
        archive. A trainer rollback in a process that has since swapped in a *newer* policy keeps the newer
        one: the lineage only moves forward; only a policy at the checkpoint's version restores its sampler.
        """
        serving = dict(state["serving"])
        version, sequence = str(serving["version"]), int(serving["sequence"])
        if sequence < self.serving.sequence:
            return
        if version != self._policy.version:
            path = self._archive / f"{version}.safetensors" if self._archive is not None else None
            if path is None or not path.is_file():
                raise PolicyUpdateRejected(
                    "not_archived",
                    f"the checkpoint was taken under {version}, whose weights are not archived",
                    version=version,
                    sequence=sequence,
                )
            candidate = self._new_candidate()
            candidate.load_state_bytes(path.read_bytes())
            self._service.swap_policy(candidate)
            self._policy = candidate
        self.serving = ServingPolicy(
            version=version,
            sequence=sequence,
            parent_version=str(serving["parent_version"]),
            policy_id=str(serving["policy_id"]),
        )
        self._watermark = max(self._watermark, int(state["watermark"]))
        self._probation = None
        self.sequence_gauge.set(self.serving.sequence)
        if state.get("policy"):
            self._policy.restore(dict(state["policy"]))
