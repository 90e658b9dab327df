"""GNNPolicy: masking, real ids, per-head credit, errors surfaced, compile fallback, save/load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from esper.leyline import CONTRACT_VERSION, pb
from esper.tamiyo.model.checkpoint import CheckpointIncompatible, read_safetensors_header
from esper.tamiyo.model.distributions import RELEVANT_HEADS
from esper.tamiyo.model.gnn import POLICY_SIZES
from esper.tamiyo.model.graph import collate
from esper.tamiyo.model.outputs import GNNOutput
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.model.proposal import ACTIONS, GraphPolicy, Policy, PolicyInferenceError
from esper.tamiyo.runtime.worker import CancelToken, DecisionCancelled
from tests.tamiyo.packets import make_packet, settings, small_policy

A = {action: index for index, action in enumerate(ACTIONS)}


def test_gnn_policy_implements_both_protocols() -> None:
    policy: Policy = small_policy()
    assert isinstance(policy, GraphPolicy)
    assert policy.version.startswith("gnn-")


def test_ids_are_never_placeholders_like_seed1_or_bp_demo() -> None:
    policy = small_policy(seed=3)
    packet = make_packet(stages={0: pb.SEED_STAGE_PROBATIONARY})
    slots = {slot.slot_id for slot in packet.topology.slots}
    for _ in range(40):
        proposal = policy.propose(packet)
        if proposal.slot_id:
            assert proposal.slot_id in slots
        if proposal.blueprint_id:
            assert proposal.blueprint_id in packet.blueprint_ids
        assert proposal.slot_id != "seed-1" and proposal.blueprint_id != "bp-demo"


def test_no_synthetic_pause_when_no_seed_candidates_exist() -> None:
    policy = small_policy(seed=1)
    packet = make_packet(n_slots=0, n_blueprints=0)
    for _ in range(20):
        proposal = policy.propose(packet)
        assert proposal.reason == "gnn"
        assert proposal.action in (pb.POLICY_ACTION_WAIT, pb.POLICY_ACTION_ADJUST_LR, pb.POLICY_ACTION_PAUSE)
        assert proposal.head_choices["action"] == A[proposal.action]
        assert proposal.log_prob < 0 or proposal.log_prob == pytest.approx(0.0, abs=1e-6)


def test_illegal_actions_are_never_sampled() -> None:
    policy = small_policy(seed=2)
    dormant_only = make_packet()
    without_blueprints = make_packet(n_blueprints=0)
    for _ in range(60):
        assert policy.propose(dormant_only).action not in (pb.POLICY_ACTION_FOSSILIZE, pb.POLICY_ACTION_CULL)
        assert policy.propose(without_blueprints).action != pb.POLICY_ACTION_GERMINATE


def test_fossilize_targets_only_probationary_slots() -> None:
    policy = small_policy(seed=5)
    packet = make_packet(stages={1: pb.SEED_STAGE_PROBATIONARY, 2: pb.SEED_STAGE_TRAINING})
    for _ in range(80):
        proposal = policy.propose(packet)
        if proposal.action == pb.POLICY_ACTION_FOSSILIZE:
            assert proposal.slot_id == "slot-1"
        if proposal.action == pb.POLICY_ACTION_GERMINATE:
            assert proposal.slot_id == "slot-0"


def test_only_relevant_heads_are_recorded_and_summed() -> None:
    policy = small_policy(seed=4)
    for _ in range(30):
        proposal = policy.propose(make_packet(stages={0: pb.SEED_STAGE_TRAINING}))
        expected = set(RELEVANT_HEADS[proposal.head_choices["action"]])
        assert set(proposal.head_choices) == expected == set(proposal.head_log_probs)
        assert proposal.log_prob == pytest.approx(sum(proposal.head_log_probs.values()))


def test_same_seed_same_weights_and_same_decisions() -> None:
    first, second = small_policy(seed=7), small_policy(seed=7)
    assert first.version == second.version
    packet = make_packet()
    assert [first.propose(packet) for _ in range(5)] == [second.propose(packet) for _ in range(5)]
    assert small_policy(seed=8).version != first.version


def test_greedy_is_deterministic_and_runs_in_eval_mode() -> None:
    policy = small_policy(greedy=True)
    policy.module.train()
    packet = make_packet()
    choices = {policy.propose(packet).head_choices["action"] for _ in range(5)}
    assert len(choices) == 1
    assert not policy.module.training


def test_evaluate_actions_gives_per_head_log_probs_entropies_and_values() -> None:
    policy = small_policy(seed=9)
    packets = [make_packet(stages={0: pb.SEED_STAGE_TRAINING}), make_packet(n_layers=6, n_slots=5)]
    graphs = [policy.builder.build(p, update_stats=False) for p in packets]
    proposals = [policy.propose_graph(g) for g in graphs]
    evaluation = policy.evaluate_actions(graphs, [p.head_choices for p in proposals])
    for index, proposal in enumerate(proposals):
        for head, log_prob in proposal.head_log_probs.items():
            assert float(evaluation.log_probs[head][index].detach()) == pytest.approx(log_prob, abs=1e-4)
        for head in evaluation.relevant:
            if head not in proposal.head_choices:
                assert float(evaluation.log_probs[head][index].detach()) == 0.0
                assert float(evaluation.entropies[head][index].detach()) == 0.0
        assert float(evaluation.values[index].detach()) == pytest.approx(proposal.value, abs=1e-4)
    loss = -evaluation.total_log_prob.sum() + evaluation.values.pow(2).sum()
    loss.backward()
    assert policy.module.action_head.weight.grad is not None


def test_save_and_load_round_trip_as_safetensors(tmp_path: Path) -> None:
    policy = small_policy(seed=11)
    path = tmp_path / "policy.safetensors"
    policy.save(path)
    assert path.read_bytes()[8:9] == b"{"  # safetensors header, not a pickle
    loaded = GNNPolicy.load(path, settings(), config=policy.config, seed=0)
    assert loaded.version == policy.version
    for name, tensor in policy.module.state_dict().items():
        assert torch.equal(tensor, loaded.module.state_dict()[name])


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.safetensors"
    small_policy().save(path)
    with pytest.raises(CheckpointIncompatible, match="hidden_dim"):
        GNNPolicy.load(path, settings())


def test_policy_size_setting_chooses_the_network_and_the_header_records_it() -> None:
    default = GNNPolicy(settings())
    full = GNNPolicy(settings(policy_size="full"))
    assert default.config.size == "default" and full.config.size == "full"
    assert (len(default.module.sage), len(default.module.gat)) == (1, 1)
    assert (len(full.module.sage), len(full.module.gat)) == (2, 2)
    header = read_safetensors_header(default.state_bytes())
    assert {key: header[key] for key in POLICY_SIZES["default"]} == {
        key: str(value) for key, value in POLICY_SIZES["default"].items()
    }


def test_checkpoint_of_another_size_is_refused_naming_the_setting_that_loads_it(tmp_path: Path) -> None:
    path = tmp_path / "policy.safetensors"
    GNNPolicy(settings(policy_size="full"), seed=3).save(path)
    with pytest.raises(
        CheckpointIncompatible, match="a 'full' policy, this one 'default': set TAMIYO_POLICY_SIZE=full"
    ):
        GNNPolicy.load(path, settings())
    loaded = GNNPolicy.load(path, settings(policy_size="full"))
    assert loaded.version == GNNPolicy(settings(policy_size="full"), seed=3).version
    GNNPolicy(settings(), seed=3).save(path)
    with pytest.raises(CheckpointIncompatible, match="set TAMIYO_POLICY_SIZE=default"):
        GNNPolicy.load(path, settings(policy_size="full"))
    small_policy().save(path)
    with pytest.raises(CheckpointIncompatible, match="none of the named sizes"):
        GNNPolicy.load(path, settings())


def test_a_full_size_checkpoint_from_before_layer_counts_were_recorded_still_loads() -> None:
    """Checkpoints written before the header named the layer counts had two SAGE and two GAT layers."""
    policy = GNNPolicy(settings(policy_size="full"), seed=5)
    payload = policy.state_bytes()
    header = read_safetensors_header(payload)
    del header["sage_layers"], header["gat_layers"]
    old = save_safetensors(load_safetensors(payload), metadata={"header": json.dumps(header)})
    loaded = GNNPolicy(settings(policy_size="full"), seed=0)
    loaded.load_state_bytes(old)
    assert loaded.version == policy.version
    with pytest.raises(CheckpointIncompatible, match="TAMIYO_POLICY_SIZE=full"):
        GNNPolicy(settings()).load_state_bytes(old)


def test_compile_failure_at_warm_up_falls_back_to_eager_with_a_reason() -> None:
    def broken(_module: torch.nn.Module) -> Any:
        raise RuntimeError("no compiler here")

    policy = small_policy(compiler=broken)
    status = policy.warm_up(sizes=((2, 1, 1),))
    assert not status.enabled and status.fallbacks == 1
    assert "no compiler here" in status.reason
    assert policy.propose(make_packet()).reason == "gnn"


def test_runtime_failure_of_compiled_forward_is_raised_not_hidden() -> None:
    calls = {"n": 0}

    def flaky(module: torch.nn.Module) -> Any:
        def run(graph: Any) -> GNNOutput:
            calls["n"] += 1
            if calls["n"] > 1:
                raise RuntimeError("kernel crashed")
            return module(graph)  # type: ignore[no-any-return]

        return run

    policy = small_policy(compiler=flaky)
    assert policy.warm_up(sizes=((2, 1, 1),)).enabled
    with pytest.raises(PolicyInferenceError, match="kernel crashed") as caught:
        policy.propose(make_packet())
    assert caught.value.compile_disabled
    assert policy.compile_status.fallbacks == 1 and not policy.compile_status.enabled
    # The next decision runs eager, and says so through compile_status.
    assert policy.propose(make_packet()).reason == "gnn"


def test_cpu_fallback_bug_successful_output_is_kept_after_a_caught_failure() -> None:
    """Regression (brief): a successful eager output after a caught compile failure was nulled (-> PAUSE)."""

    def broken(_module: torch.nn.Module) -> Any:
        raise RuntimeError("cuda path failed")

    policy = small_policy(compiler=broken, greedy=True)
    policy.warm_up(sizes=((2, 1, 1),))
    reference = small_policy(greedy=True)
    packet = make_packet()
    proposal = policy.propose(packet)
    assert proposal == reference.propose(packet)
    assert proposal.head_choices and proposal.value != 0.0


def test_cancellation_is_checked_between_layers() -> None:
    class Cancelled(Exception):
        pass

    class Token:
        def __init__(self) -> None:
            self.checks = 0

        def check(self) -> None:
            self.checks += 1
            if self.checks == 2:
                raise Cancelled

    policy = small_policy()
    token = Token()
    with pytest.raises(Cancelled):
        policy.propose_graph(policy.builder.build(make_packet()), cancel=token)
    assert token.checks == 2


def test_warm_runs_the_network_and_stops_at_a_cancelled_checkpoint() -> None:
    """`warm` (the service's warm-up ahead of a decision) takes one graph, samples nothing and stops at
    its first checkpoint once cancelled."""
    policy = small_policy()
    graph = policy.builder.build(make_packet(), update_stats=False)
    rng = torch.get_rng_state()
    policy.warm(graph, cancel=CancelToken())
    assert torch.equal(torch.get_rng_state(), rng) and not policy.module.training
    cancelled = CancelToken()
    cancelled.cancel()
    with pytest.raises(DecisionCancelled):
        policy.warm(graph, cancel=cancelled)
    with pytest.raises(PolicyInferenceError, match="one graph"):
        policy.warm(collate([graph, graph]), cancel=CancelToken())


def test_policy_checkpoint_of_another_leyline_contract_is_refused(tmp_path: Path) -> None:
    policy = small_policy()
    payload = policy.state_bytes()
    header = json.loads(_metadata(payload, tmp_path)["header"])
    assert header["leyline_contract"] == str(CONTRACT_VERSION)
    del header["leyline_contract"]  # as written before the contract version was recorded
    old = save_safetensors(load_safetensors(payload), metadata={"header": json.dumps(header)})
    with pytest.raises(CheckpointIncompatible, match="leyline_contract"):
        small_policy().load_state_bytes(bytes(old))


def _metadata(payload: bytes, tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "policy.safetensors"
    path.write_bytes(payload)
    with safe_open(str(path), framework="pt") as handle:
        metadata: dict[str, str] = handle.metadata()
    return metadata
