"""Review points on gnn.py: edge features on every relation, device from the module, schema-driven types."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch_geometric.nn import GATConv

from esper.tamiyo.gnn import TamiyoGNN, TamiyoGNNConfig
from esper.tamiyo.graph import TAMIYO_SCHEMA, GraphBuilder, GraphSchemaError, TamiyoGraph
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
    assert out.action_logits.shape == (1, 6)
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
    config = TamiyoGNNConfig(schema=TAMIYO_SCHEMA)
    model = TamiyoGNN(config)
    assert config.hidden_dim == 256 and config.gat_dim == 128 and config.gat_heads == 4
    gat = next(iter(model.gat[0].convs.values()))
    assert gat.heads == 4 and gat.out_channels * gat.heads == 128
    assert len(model.sage) == 2 and len(model.gat) == 2


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
