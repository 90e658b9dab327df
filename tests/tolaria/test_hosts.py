"""Hosts: forward shapes, dormant slots as the identity, topology, growth sites, and the auto choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from esper.kasmina import GrowthNotApplicable
from esper.leyline import pb
from esper.tolaria.data import make_signals, make_tokens
from esper.tolaria.hosts import Conv1dHost, Host, HostNotApplicable, TransformerHost, build_host
from esper.tolaria.run import RunConfigError, load_task, resolve_host

torch.set_num_threads(1)


def _conv1d(with_slots: bool = True) -> Conv1dHost:
    return Conv1dHost((3, 20), 5, with_slots=with_slots)


def _transformer(with_slots: bool = True) -> TransformerHost:
    return TransformerHost(9, 11, 4, with_slots=with_slots)


def _batch(host: Host) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if isinstance(host, TransformerHost):
        return torch.randint(0, 11, (6, 9), generator=generator)
    return torch.randn(6, 3, 20, generator=generator)


@pytest.mark.parametrize("make", [_conv1d, _transformer], ids=["conv1d", "transformer"])
def test_forward_gives_logits_per_sample(make: type[Host]) -> None:
    host = make()
    assert host(_batch(host)).shape == (6, 5 if isinstance(host, Conv1dHost) else 4)


@pytest.mark.parametrize("make", [_conv1d, _transformer], ids=["conv1d", "transformer"])
def test_dormant_slots_are_the_identity(make: type[Host]) -> None:
    torch.manual_seed(0)
    slotted = make()
    plain = make(with_slots=False)  # type: ignore[call-arg]
    plain.load_state_dict(slotted.state_dict())  # slots hold no parameters: the same weights
    x = _batch(slotted)
    assert torch.equal(slotted(x), plain(x))
    assert slotted.slots() and not plain.slots()
    assert all(slot.kind == "conv1d" for slot in slotted.slots())


@pytest.mark.parametrize(
    ("make", "layers", "slots"),
    [
        (_conv1d, ["conv1", "conv2", "head"], [("s1", "conv1", 4), ("s2", "conv2", 8)]),
        (
            _transformer,
            ["embed", "attn1", "norm1", "ff1", "proj1", "head"],
            [("f1", "ff1", 8), ("t1", "proj1", 8)],
        ),
    ],
    ids=["conv1d", "transformer"],
)
def test_topology_names_every_layer_and_slot_and_counts_every_parameter(
    make: type[Host], layers: list[str], slots: list[tuple[str, str, int]]
) -> None:
    host = make()
    topology = host.topology()
    assert [layer.layer_id for layer in topology.layers] == layers
    assert [layer.depth for layer in topology.layers] == list(range(len(layers)))
    assert [(s.slot_id, s.layer_id, s.width) for s in topology.slots] == slots
    assert {s.kind for s in topology.slots} == {host.slot_kind} == {"conv1d"}
    assert sum(layer.parameter_count for layer in topology.layers) == host.parameter_count()
    assert host.host_parameter_count() == host.parameter_count()


def test_new_hosts_start_narrow() -> None:
    conv = build_host("conv1d", (1, 64), 6)
    assert isinstance(conv, Conv1dHost)
    assert (conv.conv1.out_channels, conv.conv2.out_channels) == (4, 8)
    transformer = build_host("transformer", (16,), 4, vocab_size=12)
    assert isinstance(transformer, TransformerHost)
    block = transformer._blocks()[0]
    assert (block.ff.in_features, block.ff.out_features) == (8, 8)


@pytest.mark.parametrize(
    ("make", "widen", "deepen"),
    [(_conv1d, ["conv1", "conv2"], ["conv1", "conv2"]), (_transformer, ["ff1"], ["ff1", "proj1"])],
    ids=["conv1d", "transformer"],
)
def test_growth_sites_exist_where_the_mechanics_apply(
    make: type[Host], widen: list[str], deepen: list[str]
) -> None:
    host = make()
    for layer_id in widen:
        assert host.widen_site(layer_id).layer_id == layer_id
    for layer_id in deepen:
        site = host.deepen_site(layer_id)
        assert site.kind == "conv1d" and site.anchor in host.slots()
    with pytest.raises(GrowthNotApplicable, match="head"):
        host.widen_site("head")
    with pytest.raises(GrowthNotApplicable):
        host.deepen_site("head")


@pytest.mark.parametrize(
    ("host", "shape", "vocab", "match"),
    [
        ("conv1d", (64,), 0, "needs sequence samples"),
        ("conv1d", (1, 8, 8), 0, "needs sequence samples"),
        ("transformer", (1, 16), 12, "needs token ids"),
        ("transformer", (16,), 0, "needs token ids"),
        ("rnn", (16,), 0, "unknown host"),
    ],
)
def test_hosts_refuse_inputs_they_cannot_take(
    host: str, shape: tuple[int, ...], vocab: int, match: str
) -> None:
    with pytest.raises(HostNotApplicable, match=match):
        build_host(host, shape, 3, vocab_size=vocab)


def test_the_bundled_tasks_fit_their_hosts() -> None:
    signals = make_signals(0.5, 0, n_samples=120)
    assert build_host("conv1d", signals.input_shape, signals.num_classes)(signals.x_val).shape[1] == 6
    assert build_host("mlp", signals.input_shape, signals.num_classes)(signals.x_val).shape[1] == 6
    tokens = make_tokens(0.5, 0, n_samples=120)
    transformer = build_host(
        "transformer", tokens.input_shape, tokens.num_classes, vocab_size=tokens.vocab_size
    )
    assert transformer(tokens.x_val).shape == (len(tokens.x_val), 4)


# --- which host for which data ---------------------------------------------------------------------


def _npz(tmp_path: Path, x: np.ndarray, **more: np.ndarray) -> str:
    path = tmp_path / f"x{x.ndim}-{x.dtype}.npz"
    np.savez(path, x_train=x, y_train=np.arange(len(x)) % 2, **more)
    return str(path)


@pytest.mark.parametrize(
    ("x", "more", "host", "why"),
    [
        (np.zeros((10, 1, 8, 8)), {}, "cnn", "images"),
        (np.zeros((10, 8, 8)), {}, "cnn", "square"),
        (np.zeros((10, 3, 40)), {}, "conv1d", "sequences [C, L]"),
        (np.zeros((10, 40)), {}, "mlp", "--host conv1d"),
        (np.zeros((10, 40), dtype=np.int64), {}, "mlp", "flat features"),
        (np.zeros((10, 40), dtype=np.int64), {"vocab_size": np.array(5)}, "transformer", "token ids"),
    ],
)
def test_auto_picks_a_host_from_the_datas_shape_and_says_why(
    tmp_path: Path, x: np.ndarray, more: dict[str, np.ndarray], host: str, why: str
) -> None:
    chosen, reason = resolve_host(_npz(tmp_path, x, **more), "auto")
    assert chosen == host and why in reason


@pytest.mark.parametrize(
    ("task", "host"),
    [("digits", "cnn"), ("generated", "mlp"), ("signals", "conv1d"), ("tokens", "transformer")],
)
def test_auto_picks_each_bundled_tasks_own_host(task: str, host: str) -> None:
    assert resolve_host(task, "auto")[0] == host
    assert resolve_host(task, "mlp") == ("mlp", "chosen")


@pytest.mark.parametrize(("task", "host"), [("tokens", "mlp"), ("signals", "cnn"), ("digits", "transformer")])
def test_a_bundled_task_refuses_a_host_it_does_not_fit(task: str, host: str) -> None:
    with pytest.raises(RunConfigError, match=f"the {task} task does not fit the {host} host"):
        load_task(task, host, seed=0, difficulty=0.5)


def test_unknown_hosts_and_tasks_are_refused() -> None:
    with pytest.raises(RunConfigError, match="unknown host 'rnn'"):
        resolve_host("digits", "rnn")
    with pytest.raises(RunConfigError, match="unknown task 'cifar'"):
        resolve_host("cifar", "auto")


@pytest.mark.parametrize(
    ("kind", "shape", "widths"),
    [
        ("mlp", (64,), {"fc1": 5, "fc2": 5}),
        ("cnn", (1, 8, 8), {"conv1": 5, "conv2": 10}),
        ("conv1d", (2, 40), {"conv1": 5, "conv2": 10}),
        ("transformer", (12,), {"ff1": 5, "proj1": 8}),
    ],
)
def test_host_width_sets_where_each_host_starts(
    kind: str, shape: tuple[int, ...], widths: dict[str, int]
) -> None:
    host = build_host(kind, shape, 10, width=5, vocab_size=16)
    layers = {layer.layer_id: layer.width for layer in host.topology().layers}
    assert {name: layers[name] for name in widths} == widths
    default = build_host(kind, shape, 10, width=0, vocab_size=16)
    assert default.parameter_count() == build_host(kind, shape, 10, vocab_size=16).parameter_count()


def test_the_topology_says_which_growths_each_layer_allows() -> None:
    host = build_host("transformer", (12,), 10, vocab_size=16)
    allowed = {layer.layer_id: list(layer.growth_operations) for layer in host.topology().layers}
    assert allowed["ff1"] == [pb.SEED_OP_WIDEN, pb.SEED_OP_DEEPEN]
    assert allowed["proj1"] == [pb.SEED_OP_DEEPEN] and allowed["head"] == []
