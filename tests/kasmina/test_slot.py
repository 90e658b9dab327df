"""SeedSlot: identity when dormant, isolated while training, blended after, measured throughout."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from esper.kasmina import Blender, ConfidenceGate, SeedModule, SeedSlot, SlotMode
from esper.leyline import pb

torch.set_num_threads(1)


def _seed(width: int = 4, mode: int = pb.BLEND_MODE_RESIDUAL) -> SeedModule:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, width))
    return SeedModule(body, Blender(mode, width))


class _Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc1 = nn.Linear(3, 4)
        self.slot = SeedSlot("s", 4, "mlp", layer_id="fc1", depth=0)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.slot(torch.relu(self.fc1(x))))
        return out


def _host_grads(host: _Host, x: Tensor) -> list[Tensor]:
    host.zero_grad()
    host(x).pow(2).sum().backward()  # type: ignore[no-untyped-call]
    return [p.grad.clone() for p in (*host.fc1.parameters(), *host.head.parameters()) if p.grad is not None]


def test_dormant_slot_is_the_identity_without_parameters() -> None:
    slot = SeedSlot("s", 4, "mlp", layer_id="l", depth=0)
    x = torch.randn(2, 4)
    assert slot(x) is x
    assert list(slot.parameters()) == []
    assert slot.is_clean()


def test_training_leaves_host_output_and_gradients_unchanged_and_trains_the_seed() -> None:
    host = _Host()
    x = torch.randn(5, 3)
    dormant_out = host(x).detach()
    dormant_grads = _host_grads(host, x)
    seed = _seed()
    host.slot.install(seed)
    host.slot.mode = SlotMode.INCUBATE
    assert torch.equal(host(x).detach(), dormant_out)
    training_grads = _host_grads(host, x)
    for before, after in zip(dormant_grads, training_grads, strict=True):
        assert torch.equal(before, after)  # no gradient from the seed reaches the host
    seed_grads = [p.grad for p in seed.body.parameters()]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in seed_grads)
    assert host.slot.isolation_violations == 0
    assert len(host.slot.training_gains) == 1


def test_isolation_violation_is_counted() -> None:
    host = _Host()

    class Leaky(nn.Module):
        def __init__(self, borrowed: nn.Linear) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.__dict__["borrowed"] = borrowed  # not registered: a host tensor the seed should not touch

        def forward(self, x: Tensor) -> Tensor:
            out: Tensor = self.inner(x) + self.borrowed.weight.sum()
            return out

    host.slot.install(SeedModule(Leaky(host.fc1), Blender(pb.BLEND_MODE_RESIDUAL, 4)))
    host.slot.mode = SlotMode.INCUBATE
    host(torch.randn(2, 3)).sum().backward()  # type: ignore[no-untyped-call]
    assert host.slot.isolation_violations > 0


def test_blending_changes_output_and_trains_the_seed_and_alpha_zero_is_host_only() -> None:
    host = _Host()
    x = torch.randn(5, 3)
    dormant_out = host(x).detach()
    seed = _seed()
    host.slot.install(seed)
    host.slot.mode = SlotMode.BLEND
    host.slot.alpha = 0.5
    out = host(x)
    assert not torch.allclose(out.detach(), dormant_out)
    out.sum().backward()  # type: ignore[no-untyped-call]
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in seed.body.parameters())
    host.slot.alpha_override = 0.0
    assert torch.equal(host(x).detach(), dormant_out)


def test_sanity_mode_checks_shape_and_finiteness_without_changing_output() -> None:
    slot = SeedSlot("s", 4, "mlp", layer_id="l", depth=0)
    slot.install(SeedModule(nn.Linear(4, 3), Blender(pb.BLEND_MODE_RESIDUAL, 4)))
    slot.mode = SlotMode.SANITY
    x = torch.randn(2, 4)
    assert torch.equal(slot(x), x)
    assert slot.sanity is not None and not slot.sanity[0]


def test_gradient_probe_measures_host_gradient_once() -> None:
    host = _Host()
    host.slot.arm_gradient_probe()
    host(torch.randn(4, 3)).sum().backward()  # type: ignore[no-untyped-call]
    assert host.slot.host_gradient_norm is not None and host.slot.host_gradient_norm > 0
    assert host.slot.mode == SlotMode.IDENTITY


@pytest.mark.parametrize(
    "mode", [pb.BLEND_MODE_CONVEX, pb.BLEND_MODE_RESIDUAL, pb.BLEND_MODE_CHANNEL, pb.BLEND_MODE_CONFIDENCE]
)
@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 5, 5)])
def test_every_blend_mode_is_identity_at_alpha_zero_and_mixes_above(
    mode: int, shape: tuple[int, ...]
) -> None:
    blender = Blender(mode, 4)
    x, s = torch.randn(shape), torch.randn(shape)
    assert torch.allclose(blender(x, x, s, 0.0), x)
    assert not torch.allclose(blender(x, x, s, 0.7), x)


def test_channel_mode_has_a_learnable_alpha_per_channel() -> None:
    blender = Blender(pb.BLEND_MODE_CHANNEL, 4)
    assert blender.channel_logits is not None and blender.channel_logits.shape == (4,)
    x, s = torch.zeros(2, 4), torch.ones(2, 4)
    with torch.no_grad():
        blender.channel_logits[0] = -50.0
    out = blender(x, x, s, 1.0).detach()
    assert float(out[:, 0].abs().max()) < 1e-6 and float(out[:, 1].min()) > 0.9


def test_confidence_mode_keeps_alpha_between_lo_and_hi() -> None:
    gate = ConfidenceGate.from_parameters({"gate_k": 20.0, "gate_tau": 0.6, "alpha_lo": 0.2, "alpha_hi": 0.6})
    blender = Blender(pb.BLEND_MODE_CONFIDENCE, 4, gate)
    peaked = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    flat = torch.zeros(1, 4)
    assert float(blender.confidence_alpha(peaked, 1.0)) == pytest.approx(0.6, abs=1e-3)
    assert float(blender.confidence_alpha(flat, 1.0)) == pytest.approx(0.2, abs=1e-2)


def test_confidence_parameters_are_validated() -> None:
    from esper.kasmina import InvalidBlendParameters

    with pytest.raises(InvalidBlendParameters):
        ConfidenceGate.from_parameters({"alpha_lo": 0.9, "alpha_hi": 0.1})
    with pytest.raises(InvalidBlendParameters):
        ConfidenceGate.from_parameters({"gate_q": 1.0})
