"""The policy sees what it needs: a run's packets carry every feature Tamiyo's graph reads (training
metrics, hardware, blueprint descriptors), and a missing one fails a strict learner instead of being
zeroed silently."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from esper.assembly import run_directory
from esper.assembly.tamiyo import metadata_cache
from esper.kasmina import KasminaSettings, SeedManager
from esper.leyline import CleanupStack, SignatureVerifier, load_settings, pb
from esper.nissa.layout import RunLayout
from esper.simic.reward import Reward
from esper.simic.transitions import Transition, TransitionSet, build_samples
from esper.tamiyo import BlueprintMetadataCache
from esper.tamiyo.model.builder import GraphBuilder
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.model.proposal import ACTIONS
from esper.tamiyo.model.schema import ACTIVE_STAGES, MissingFeatureError
from esper.tamiyo.settings import TamiyoSettings
from esper.tolaria.data import make_task
from esper.tolaria.hosts import build_host
from esper.tolaria.packet import device_hardware, host_hardware
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer
from esper.urza import BlueprintCatalogue
from tests.integration.scripted import ScriptedController

torch.set_num_threads(1)
SECRET = b"simic-inputs-test-secret-0123456"
RUN_ID = "run-policy-inputs"
STRICT = TamiyoSettings(strict_graph=True)


class Recording(ScriptedController):
    """The scripted controller, keeping every packet it was asked to decide on."""

    def __init__(self) -> None:
        super().__init__(SECRET, germinate=("h1",), blueprints={"h1": "mlp_small"})
        self.packets: list[pb.SystemStatePacket] = []

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        self.packets.append(pb.SystemStatePacket.FromString(packet.SerializeToString()))
        return super().evaluate_step(packet)


@pytest.fixture
def catalogue(tmp_path: Path) -> Iterator[BlueprintCatalogue]:
    catalogue = BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3")
    yield catalogue
    catalogue.close()


@pytest.fixture
def metadata(catalogue: BlueprintCatalogue) -> Iterator[BlueprintMetadataCache]:
    cleanup = CleanupStack(lambda name, exc: None)
    with cleanup:
        yield metadata_cache(catalogue, STRICT, None, cleanup)


@pytest.fixture
def packets(tmp_path: Path, catalogue: BlueprintCatalogue) -> list[pb.SystemStatePacket]:
    """The packets of a short run that germinates a seed (so active seeds appear too)."""
    return run_packets(tmp_path, catalogue)


def run_packets(
    tmp_path: Path, catalogue: BlueprintCatalogue, **overrides: object
) -> list[pb.SystemStatePacket]:
    dataset = make_task(0.3, 0, n_features=8, n_classes=3, n_samples=320)
    settings = load_settings(
        TolariaSettings, environ={}, epochs=3, batch_size=32, decision_interval=4, seed=1, **overrides
    )
    torch.manual_seed(1)
    host = build_host("mlp", dataset.input_shape, dataset.num_classes)
    kasmina = load_settings(
        KasminaSettings, environ={}, min_training_steps=4, improvement_window=1, probation_steps=4
    )
    manager = SeedManager(host.slots(), catalogue, SignatureVerifier(SECRET), kasmina, training_run_id=RUN_ID)
    controller = Recording()
    Trainer(
        settings=settings,
        dataset=dataset,
        host=host,
        manager=manager,
        controller=controller,
        blueprint_ids=catalogue.ids_for("mlp"),
        run_dir=run_directory(RunLayout(tmp_path / "run")),
        training_run_id=RUN_ID,
    ).fit()
    return controller.packets


def test_a_runs_packets_carry_the_training_metrics_and_the_hardware(
    packets: list[pb.SystemStatePacket],
) -> None:
    assert packets
    for packet in packets:
        metrics = packet.training_metrics
        assert metrics["learning_rate"] == pytest.approx(metrics["lr"]) and metrics["learning_rate"] > 0
        assert metrics["grad_norm"] > 0.0  # measured after the backward pass that precedes the decision
        assert packet.hardware_context.total_memory_gb > 0
        assert 0 < packet.hardware_context.available_memory_gb <= packet.hardware_context.total_memory_gb
        assert 0 <= packet.hardware_context.utilization_percent <= 100


def test_a_runs_packets_build_strict_graphs_with_full_coverage(
    packets: list[pb.SystemStatePacket], metadata: BlueprintMetadataCache
) -> None:
    builder = GraphBuilder(STRICT, blueprint_metadata=metadata)
    graphs = [builder.build(packet) for packet in packets]  # strict: raises on any missing feature
    assert all(graph.coverage is not None and not graph.coverage.missing for graph in graphs)
    # The run did grow: active seeds, whose metrics are expected, were covered too.
    assert any(state.stage in ACTIVE_STAGES for packet in packets for state in packet.seed_states)


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        (lambda p: p.training_metrics.pop("grad_norm"), "training_metrics[grad_norm]"),
        (lambda p: p.ClearField("hardware_context"), "hardware_context"),
    ],
)
def test_a_deliberately_missing_feature_raises_in_a_strict_learner(
    packets: list[pb.SystemStatePacket], metadata: BlueprintMetadataCache, remove: object, named: str
) -> None:
    packet = packets[-1]
    remove(packet)  # type: ignore[operator]
    decision = pb.DecisionRecord(
        command_id="cmd-1", training_run_id=RUN_ID, action=pb.POLICY_ACTION_WAIT, log_prob=0.0
    )
    decision.packet.CopyFrom(packet)
    transition = Transition(
        decision=decision,
        report=pb.FieldReport(command_id="cmd-1"),
        reward=Reward(total=0.0, accuracy=0.0, loss=0.0, contribution=0.0, param_cost=0.0),
        done=True,
    )
    transitions = TransitionSet(transitions=[transition])

    def new_builder() -> GraphBuilder:
        return GraphBuilder(STRICT, blueprint_metadata=metadata)

    with pytest.raises(MissingFeatureError, match=named.replace("[", r"\[").replace("]", r"\]")):
        build_samples(new_builder, transitions, strict=True)
    samples, skipped = build_samples(new_builder, transitions)  # lenient: counted, never silent
    assert not samples and skipped["graph:MissingFeatureError"] == 1


def test_a_blueprint_without_its_catalogue_entry_is_a_missing_feature(
    packets: list[pb.SystemStatePacket],
) -> None:
    with pytest.raises(MissingFeatureError, match="descriptor"):
        GraphBuilder(STRICT).build(packets[0])  # no catalogue lookup wired


def test_a_strict_gnn_warms_up_on_its_placeholder_graphs() -> None:
    GNNPolicy(STRICT).warm_up()  # the warm-up packets have no catalogue entries nor metrics


def test_a_busy_shared_machine_does_not_stop_growth_at_the_resource_gate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The packet's hardware is what the run has room for: the load of other processes (a saturated
    2-core machine) must not read as 100 % utilisation, which Tamiyo's resource gate refuses growth on."""
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    hardware = host_hardware()
    assert hardware.total_memory_gb > 0
    assert hardware.utilization_percent < TamiyoSettings().risk_max_utilization_percent


def test_lifecycle_only_masks_the_learning_rate_and_pause_actions(
    packets: list[pb.SystemStatePacket],
) -> None:
    lifecycle = TamiyoSettings(lifecycle_actions_only=True)
    masked = GraphBuilder(lifecycle).build(packets[0]).action_mask[0]
    open_ = GraphBuilder(TamiyoSettings()).build(packets[0]).action_mask[0]
    for action in (pb.POLICY_ACTION_ADJUST_LR, pb.POLICY_ACTION_PAUSE):
        assert bool(open_[ACTIONS.index(action)]) and not bool(masked[ACTIONS.index(action)])
    assert bool(masked[ACTIONS.index(pb.POLICY_ACTION_WAIT)])
    policy = GNNPolicy(lifecycle)
    chosen = {policy.propose(packet).action for packet in packets for _ in range(5)}
    assert not chosen & {pb.POLICY_ACTION_ADJUST_LR, pb.POLICY_ACTION_PAUSE}


def test_a_cuda_runs_hardware_is_its_devices_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[torch.device] = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return 3 << 30, 8 << 30  # free, total

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    hardware = device_hardware("cuda:1")
    assert asked == [torch.device("cuda:1")]
    assert (hardware.device_type, hardware.device_id) == ("cuda", "cuda:1")
    assert (hardware.total_memory_gb, hardware.available_memory_gb) == (8.0, 3.0)
    cpu = device_hardware("cpu:0")
    assert (cpu.device_type, cpu.device_id) == ("cpu", "cpu:0") and cpu.total_memory_gb > 0


def test_a_run_told_not_to_measure_its_hardware_names_its_device_only(
    tmp_path: Path, catalogue: BlueprintCatalogue
) -> None:
    """Runs compared bit for bit (resume tests) must not read the machine's free memory."""
    packets = run_packets(tmp_path, catalogue, hardware_context=False)
    assert packets
    for packet in packets:
        assert packet.hardware_context.device_type == "cpu"
        assert not packet.hardware_context.HasField("total_memory_gb")
