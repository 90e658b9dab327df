"""Tamiyo for a run: the blueprint metadata cache, the service with its policy, bound as Tolaria's
controller. Everything opened here is pushed on the caller's clean-up stack."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esper.leyline import CleanupStack, ConfigurationError, pb
from esper.oona import Bus, TelemetryPublisher
from esper.tamiyo import BlueprintMetadataCache
from esper.tamiyo.settings import TamiyoSettings
from esper.tolaria.controller import BoundController
from esper.urza import BlueprintCatalogue, BusChangePublisher, CatalogueChangeFeed, NotificationFailed

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from esper.tamiyo import Policy, TamiyoService, TamiyoStore

logger = logging.getLogger("esper.assembly")

Warn = Callable[[str], None]
"""Tells the operator something they act on (the CLI prints it on the terminal)."""


def open_catalogue(path: Path, bus: Bus | None, cleanup: CleanupStack) -> BlueprintCatalogue:
    """The blueprint catalogue at `path`, opened once; with a bus its changes are announced there, and
    what an earlier process committed but could not announce is announced now (or stays in the outbox)."""
    publisher = None if bus is None else BusChangePublisher(bus)
    catalogue = BlueprintCatalogue.open_default(path, publisher=publisher)
    cleanup.push("close the blueprint catalogue", catalogue.close)
    if publisher is not None:
        try:
            catalogue.publish_pending()
        except NotificationFailed as exc:
            logger.warning("catalogue notifications still pending: %s", exc)
    return catalogue


def metadata_cache(
    catalogue: BlueprintCatalogue, settings: TamiyoSettings, bus: Bus | None, cleanup: CleanupStack
) -> BlueprintMetadataCache:
    """Tamiyo's blueprint metadata cache over `catalogue`, warmed with every entry and, with a bus, kept
    fresh by Urza's change notifications (a background thread on a consumer group of its own)."""
    feed_factory = None if bus is None else functools.partial(CatalogueChangeFeed, bus)
    cache = BlueprintMetadataCache(catalogue, settings, feed_factory=feed_factory)
    cleanup.push("close the blueprint metadata cache", cache.close)
    cache.warm(descriptor.blueprint_id for descriptor in catalogue.list())
    if bus is not None:
        cache.start()
    return cache


def load_policy(
    name: str, settings: TamiyoSettings, metadata: BlueprintMetadataCache, store: TamiyoStore | None
) -> Policy:
    """The policy `name` (heuristic or gnn); the GNN has the weights of TAMIYO_POLICY_CHECKPOINT, or
    untrained (seeded) ones, and keeps its normaliser statistics in the run's store when there is one."""
    if name == "heuristic":
        from esper.tamiyo import HeuristicPolicy

        return HeuristicPolicy(settings)
    if name != "gnn":
        raise ConfigurationError(f"unknown policy {name!r}; available: heuristic, gnn")
    from esper.tamiyo import GNNPolicy  # PyTorch Geometric loads only for the GNN

    checkpoint = settings.policy_checkpoint
    if checkpoint is not None and not checkpoint.is_file():
        raise ConfigurationError(f"policy checkpoint {checkpoint} does not exist")
    # The policy's graph builder sees the same catalogue entries as the risk gates.
    inputs: dict[str, Any] = {"blueprint_metadata": metadata}
    if store is not None:
        inputs["normalizer_store"] = store.normalizer_store()
    if checkpoint is None:
        return GNNPolicy(settings, **inputs)
    return _load_gnn(checkpoint, settings, inputs)


def _load_gnn(checkpoint: Path, settings: TamiyoSettings, inputs: dict[str, Any]) -> Policy:
    """The GNN with the weights of `checkpoint`; a file that is not a readable safetensors checkpoint
    (truncated, say) is a ConfigurationError naming it, whatever the decoder raised."""
    from safetensors import SafetensorError

    from esper.tamiyo import CheckpointIncompatible, GNNPolicy

    try:
        return GNNPolicy.load(checkpoint, settings, **inputs)
    except (SafetensorError, OSError, ValueError, CheckpointIncompatible) as exc:
        raise ConfigurationError(
            f"policy checkpoint {checkpoint} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc


class TamiyoParts:
    """The Tamiyo of one run: its service, the policy-update intake (GNN policies) and the controller."""

    def __init__(self, service: TamiyoService, controller: BoundController, intake: Any | None) -> None:
        self.service = service
        self.controller = controller
        self.intake = intake


def build_tamiyo(
    policy: Policy,
    settings: TamiyoSettings,
    secret: bytes,
    cleanup: CleanupStack,
    *,
    metadata: BlueprintMetadataCache,
    run_ended: Callable[[], bool],
    bus: Bus | None = None,
    store: TamiyoStore | None = None,
    policies: Path | None = None,
    feed_group: str = "",
    registry: CollectorRegistry | None = None,
    warn: Warn | None = None,
) -> TamiyoParts:
    """Tamiyo's service deciding with `policy`, bound for Tolaria.

    With a `store` and a `bus`, decisions and field reports are recorded durably and leave through the
    outbox once a checkpoint covers them; a GNN also takes signed policy updates from the bus (consumer
    group `feed_group`), archiving the accepted weights in `policies`. At clean-up, open observation
    windows close as ABORTED when `run_ended()`, and stay open for a resume otherwise."""
    from esper.tamiyo import TamiyoService

    durable: dict[str, Any] = {}
    if store is not None and bus is not None:
        durable = {
            "store": store,
            "bus": bus,
            # Decisions and reports leave only once a durable checkpoint covers them: a resume never
            # finds that Simic learnt from steps it decides again.
            "hold_until_checkpoint": True,
            # HIGH and CRITICAL packets on the emergency stream, the rest on telemetry.
            "telemetry_sink": TelemetryPublisher(bus),
        }
    feeds: list[Any] = []  # the policy-update feed, for GNN policies

    def remove_groups() -> None:
        if run_ended():  # a run that can still be resumed keeps its place on the policy stream
            for feed in feeds:
                feed.remove_group()

    cleanup.push("delete the policy feed's consumer group", remove_groups)
    service = TamiyoService(
        settings, policy, secret, blueprint_metadata=metadata, registry=registry, **durable
    )
    cleanup.push("close Tamiyo's service", lambda: service.close(abort_open_windows=run_ended()))
    if not _is_gnn(policy):
        return TamiyoParts(service, pipelined_controller(service), None)
    from esper.tamiyo import PolicyUpdateFeed, PolicyUpdateIntake

    feed = None
    if durable:
        feed = PolicyUpdateFeed(durable["bus"], feed_group)
        feeds.append(feed)
    intake = PolicyUpdateIntake(
        service,
        policy,
        secret,
        settings,
        config=policy.config,  # type: ignore[attr-defined]  # a GNN: `_is_gnn` said so
        feed=feed,
        archive=policies if durable else None,
        lineage=store if durable else None,
    )
    # The service is the controller whatever the policy: it consults the intake between decisions and
    # saves the intake's state with its own; a GNN also rehearses and warms up ahead of decisions.
    controller = replace(
        pipelined_controller(service),
        rehearse=announcing_misfit(service.prepare, service, warn),
        warm_ahead=service.anticipate,
    )
    return TamiyoParts(service, controller, intake)


def pipelined_controller(service: TamiyoService) -> BoundController:
    """`service` bound for Tolaria as `esper run` binds it: decisions submitted and collected
    `decision_lag_steps` later, checkpoints and rewinds passed on, the service's state (its policy's, or
    its update intake's) saved and restored."""
    return BoundController(
        decide=service.evaluate_step,
        save=service.export_state,
        load=service.restore_state,
        start=service.submit,
        finish=service.collect,
        release=service.checkpointed,
        rewind=service.rewound,
    )


def _is_gnn(policy: Policy) -> bool:
    """Whether `policy` is the GNN (which takes signed weight updates), without importing PyTorch
    Geometric for a heuristic run: a GNN exists only once its module was imported."""
    module = sys.modules.get("esper.tamiyo.model.policy")
    return module is not None and isinstance(policy, module.GNNPolicy)


def announcing_misfit(
    prepare: Callable[[pb.SystemStatePacket], None], service: TamiyoService, warn: Warn | None
) -> Callable[[pb.SystemStatePacket], None]:
    """`prepare`, then, the first time the service measured that its policy does not fit the step budget
    on this machine, `warn` with the figure and what to do (the event is the service's)."""
    announced = False

    def rehearse(packet: pb.SystemStatePacket) -> None:
        nonlocal announced
        prepare(packet)
        fit = service.policy_fit
        if fit is not None and not fit.fits and not announced:
            announced = True
            if warn is not None:
                warn(fit.message)

    return rehearse
