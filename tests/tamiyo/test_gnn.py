"""Review points on gnn.py: edge features on every relation, device from the module, schema-driven types."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch_geometric.nn import GATConv

from esper.tamiyo.model.builder import GraphBuilder
from esper.tamiyo.model.gnn import TamiyoGNN, TamiyoGNNConfig
from esper.tamiyo.model.graph import TamiyoGraph
from esper.tamiyo.model.outputs import GNNOutput
from esper.tamiyo.model.proposal import ACTIONS
from esper.tamiyo.model.schema import TAMIYO_SCHEMA, GraphSchemaError
from tests.tamiyo.packets import SMALL, make_packet, settings


def graph() -> TamiyoGraph:
    return GraphBuilder(settings()).build(make_packet())


def test_gat_never_gets_edge_attr_none_zero_features_are_injected(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor | None] = []
    original = GATConv.forward

    def spy(self: GATConv, x: Any, edge_index: Any, edge_attr: Any = None, **kwargs: Any) -> Any:
        seen.append(edge_attr)
        return original(self, x, edge_index, edge_attr, **kwargs)

    monkeypatch.setattr(GATConv, "forward", spy)
    featureless = [rel.key for rel in TAMIYO_SCHEMA.relations if not rel.edge_features]
    assert featureless, "the schema must keep a relation without edge features for this test"
    g = graph()
    for key in featureless:
        assert key not in g.edge_attr
    TamiyoGNN(SMALL).eval()(g)
    assert len(seen) == 2 * len(TAMIYO_SCHEMA.relations)
    assert all(attr is not None for attr in seen)
    injected = TamiyoGNN(SMALL).edge_attrs(g, torch.device("cpu"))
    for key in featureless:
        assert torch.count_nonzero(injected[key]) == 0


def test_relation_with_declared_features_missing_fails_fast() -> None:
    g = graph()
    del g.edge_attr[("layer", "hosts", "slot")]
    with pytest.raises(GraphSchemaError, match="declared edge features are missing"):
        TamiyoGNN(SMALL)(g)


def test_device_comes_from_module_parameters_not_from_the_input() -> None:
    model = TamiyoGNN(SMALL)
    assert model.device == model.action_head.weight.device
    model = model.to_empty(device="meta")
    attrs = model.edge_attrs(graph(), model.device)
    assert {attr.device.type for attr in attrs.values()} == {"meta"}


def test_a_graph_missing_a_relation_is_a_typed_error_naming_it() -> None:
    g = graph()
    del g.edge_index[("layer", "hosts", "slot")]
    g.edge_attr.pop(("layer", "hosts", "slot"), None)
    with pytest.raises(GraphSchemaError, match=r"\('layer', 'hosts', 'slot'\)\] of the schema are missing"):
        TamiyoGNN(SMALL).eval()(g)


def test_device_choice_survives_a_graph_without_layers_slots_or_blueprints() -> None:
    empty = GraphBuilder(settings()).build(make_packet(n_layers=0, n_slots=0, n_blueprints=0))
    out = TamiyoGNN(SMALL).eval()(empty)
    assert out.action_logits.shape == (1, len(ACTIONS))
    assert torch.isfinite(out.value).all()


def test_new_node_type_fails_fast_instead_of_bypassing_the_encoder() -> None:
    g = graph()
    g.x["optimizer"] = torch.zeros(1, 2)
    g.mask["optimizer"] = torch.ones(1, 2)
    with pytest.raises(GraphSchemaError, match="do not match the schema"):
        TamiyoGNN(SMALL)(g)


def test_encoders_and_convolutions_are_driven_by_the_schema() -> None:
    model = TamiyoGNN(SMALL)
    assert set(model.encoders.keys()) == set(TAMIYO_SCHEMA.type_names)
    for layer in [*model.sage, *model.gat]:
        # HeteroConv stores its convolutions under "<src___relation___dst>" keys.
        keys = {tuple(key.strip("<>").split("___")) for key in layer.convs}
        assert keys == {rel.key for rel in TAMIYO_SCHEMA.relations}


def test_full_size_architecture_matches_the_design() -> None:
    config = TamiyoGNNConfig.sized("full", TAMIYO_SCHEMA)
    model = TamiyoGNN(config)
    assert config.hidden_dim == 256 and config.gat_dim == 128 and config.gat_heads == 4
    gat = next(iter(model.gat[0].convs.values()))
    assert gat.heads == 4 and gat.out_channels * gat.heads == 128
    assert len(model.sage) == 2 and len(model.gat) == 2
    assert config.size == "full"


def test_default_size_is_a_narrow_shallow_network_and_the_config_default() -> None:
    config = TamiyoGNNConfig(schema=TAMIYO_SCHEMA)
    assert config == TamiyoGNNConfig.sized("default", TAMIYO_SCHEMA) and config.size == "default"
    model = TamiyoGNN(config)
    assert (config.hidden_dim, config.gat_dim, config.gat_heads) == (64, 32, 4)
    assert len(model.sage) == 1 and len(model.gat) == 1
    full = TamiyoGNN(TamiyoGNNConfig.sized("full", TAMIYO_SCHEMA))

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(model) * 20 < count(full)
    assert SMALL.size == "custom"


def test_an_unknown_size_or_a_degenerate_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy size 'huge'"):
        TamiyoGNNConfig.sized("huge", TAMIYO_SCHEMA)
    with pytest.raises(ValueError, match="gat_layers must be at least 1"):
        TamiyoGNNConfig(schema=TAMIYO_SCHEMA, gat_layers=0)
    with pytest.raises(ValueError, match="sage_layers must be at least 0"):
        TamiyoGNNConfig(schema=TAMIYO_SCHEMA, sage_layers=-1)


@pytest.mark.parametrize(("sage_layers", "gat_layers"), [(0, 1), (1, 1), (1, 3), (3, 2)])
def test_every_depth_runs_the_same_function_on_all_three_paths(sage_layers: int, gat_layers: int) -> None:
    config = TamiyoGNNConfig(
        schema=TAMIYO_SCHEMA,
        hidden_dim=16,
        gat_dim=8,
        gat_heads=2,
        sage_layers=sage_layers,
        gat_layers=gat_layers,
    )
    torch.manual_seed(0)
    model = TamiyoGNN(config).eval()
    assert (len(model.sage), len(model.gat)) == (sage_layers, gat_layers)
    g = graph()
    with torch.inference_mode():
        reference = model.forward_message_passing(g)
        dense = model(g)
    model.build_plan(g)  # raises PlanError if the plan disagrees with the dense path
    with torch.inference_mode():
        planned = model(g)
    for name in GNNOutput.__dataclass_fields__:  # every head, the layer pointer and amount too
        want = getattr(reference, name)
        assert torch.allclose(getattr(dense, name), want, atol=1e-5)
        assert torch.allclose(getattr(planned, name), want, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao's deprecation
def test_device_of_a_quantised_module_still_comes_from_its_parameters() -> None:
    """int8 dynamic quantisation replaces `nn.Linear`s (whose `weight` becomes a method): the device is
    still read from the module's own parameters, and the message-passing path runs on it."""
    from torch.ao.quantization import quantize_dynamic

    model = TamiyoGNN(TamiyoGNNConfig(schema=TAMIYO_SCHEMA)).eval()
    quantised = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    assert not isinstance(quantised.action_head.weight, torch.Tensor)  # really quantised
    assert quantised.device == torch.device("cpu")
    g = graph()
    assert {attr.device for attr in quantised.edge_attrs(g, quantised.device).values()} == {quantised.device}
    with torch.inference_mode():
        out = quantised.forward_message_passing(g)
    assert out.action_logits.shape == (1, len(ACTIONS)) and torch.isfinite(out.value).all()


def test_checkpoint_is_called_between_layers() -> None:
    calls: list[int] = []
    TamiyoGNN(SMALL).eval()(graph(), lambda: calls.append(1))
    assert len(calls) == 5


def test_dense_inference_checks_cancellation_inside_each_layer() -> None:
    """A late decision stops within a fraction of a layer: the dense kernel checks per node type (SAGE) and
    per relation (GAT) besides between layers."""
    calls: list[int] = []
    model = TamiyoGNN(SMALL).eval()
    with torch.inference_mode():
        model(graph(), lambda: calls.append(1))
    assert len(calls) >= 5 + 2 * len(TAMIYO_SCHEMA.type_names) + 2 * len(TAMIYO_SCHEMA.relations)
