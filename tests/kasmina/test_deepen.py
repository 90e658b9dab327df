"""Deepen: an inserted block is the identity at insertion, learns, and leaves cleanly."""

from __future__ import annotations

import pytest
import torch

from esper.kasmina import GrowthMode, GrowthNotApplicable, IdentityBlock
from tests.kasmina.growth_support import make_case

torch.set_num_threads(1)

DEEPEN_CASES = [
    ("mlp", "fc1"),
    ("mlp", "fc2"),
    ("cnn", "conv1"),
    ("cnn", "conv2"),
    ("conv1d", "conv1"),
    ("conv1d", "conv2"),
    ("sequence", "conv1"),
    ("sequence", "conv2"),
    ("transformer", "ff1"),
    ("transformer", "proj1"),
]
DEEPEN_IDS = [f"{kind}-{layer}" for kind, layer in DEEPEN_CASES]


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize(("kind", "layer"), DEEPEN_CASES, ids=DEEPEN_IDS)
def test_inserted_block_leaves_the_host_output_unchanged(kind: str, layer: str, activation: str) -> None:
    case = make_case(kind)
    before = case.host(case.x).detach()
    block = IdentityBlock.for_site(case.deepen_site(layer), hidden=5, activation=activation)
    block.attach(case.deepen_site(layer))
    assert torch.allclose(case.host(case.x).detach(), before, atol=1e-6, rtol=0.0)


@pytest.mark.parametrize(("kind", "layer"), DEEPEN_CASES, ids=DEEPEN_IDS)
def test_gradients_reach_the_inserted_block(kind: str, layer: str) -> None:
    case = make_case(kind)
    site = case.deepen_site(layer)
    block = IdentityBlock.for_site(site)
    block.attach(site)
    case.loss().backward()  # type: ignore[no-untyped-call]
    assert block.project.weight.grad is not None and float(block.project.weight.grad.norm()) > 0
    torch.optim.SGD(block.parameters(), lr=0.5).step()
    block.zero_grad()
    case.loss().backward()  # type: ignore[no-untyped-call]
    assert block.expand.weight.grad is not None and float(block.expand.weight.grad.norm()) > 0


@pytest.mark.parametrize(("kind", "layer"), DEEPEN_CASES, ids=DEEPEN_IDS)
def test_detached_block_leaves_the_host_as_before(kind: str, layer: str) -> None:
    case = make_case(kind)
    before = case.host(case.x).detach()
    site = case.deepen_site(layer)
    block = IdentityBlock.for_site(site)
    block.attach(site)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        case.loss().backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    assert not torch.equal(case.host(case.x).detach(), before)
    block.detach()
    assert not block.attached
    assert torch.equal(case.host(case.x).detach(), before)


def test_incubating_block_sends_no_gradient_to_the_host() -> None:
    case = make_case("cnn")
    case.loss().backward()  # type: ignore[no-untyped-call]
    alone = [p.grad.clone() for p in case.host.parameters() if p.grad is not None]
    case.host.zero_grad()
    site = case.deepen_site("conv1")
    block = IdentityBlock.for_site(site)
    torch.nn.init.normal_(block.project.weight)
    block.mode = GrowthMode.INCUBATE
    block.attach(site)
    case.loss().backward()  # type: ignore[no-untyped-call]
    for before, after in zip(
        alone, [p.grad for p in case.host.parameters() if p.grad is not None], strict=True
    ):
        assert torch.equal(before, after)
    assert block.expand.weight.grad is not None and float(block.expand.weight.grad.norm()) > 0


def test_blocks_refuse_unknown_kinds_and_hosts_unknown_layers() -> None:
    with pytest.raises(GrowthNotApplicable, match="block kind"):
        IdentityBlock("conv3d", 4, 4)
    with pytest.raises(GrowthNotApplicable, match="no layer"):
        make_case("cnn").deepen_site("head")
