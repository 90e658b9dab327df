# Over 500 lines: the four built-in hosts, which share one base and its growth sites.
"""Hosts: small, deliberately narrow models that declare seed slots in their forward pass.

A host is capacity-limited on purpose (DESIGN §10): growth can only show when the host alone plateaus.
Each host exposes its `HostTopology` (layers and slots) for the controller.

Every host takes its widths as arguments. `build_host`, which `esper run` and the benchmarks use, starts
every host narrow (`DEFAULT_WIDTHS`: 4 MLP units per layer, 4 and 8 channels for the CNNs, an 8-wide
Transformer with an 8-unit feed-forward layer), so that growth decides what the model becomes. The
classes' own defaults (12 MLP units; 6 and 12 channels for the 2-D CNN) are the historical widths.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from esper.kasmina import Bridge, DeepenSite, GrowthNotApplicable, SeedSlot, WidenSite
from esper.leyline import EsperError, pb

HOST_KINDS = ("mlp", "cnn", "conv1d", "transformer")
POOLED_SIDE = 2
POOLED_LENGTH = 4
"""Cells of the 1-D CNN's last feature map that its head sees (an average pool keeps where, coarsely)."""


class HostNotApplicable(EsperError):
    """The host cannot be built for this input (a CNN needs image-shaped samples)."""

    def __init__(self, host: str, reason: str) -> None:
        self.host = host
        self.reason = reason
        super().__init__(f"host {host!r}: {reason}")


class Host(nn.Module):
    """A model with seed slots. `slot_kind` is the kind of its slots ("mlp", "conv" or "conv1d")."""

    slot_kind: str = ""

    def slots(self) -> list[SeedSlot]:
        """The host's slots, in forward order."""
        return [module for module in self.modules() if isinstance(module, SeedSlot)]

    def host_layers(self) -> list[tuple[str, str, int, nn.Module]]:
        """(layer id, kind, width, module) of the host's own layers, in forward order."""
        raise NotImplementedError

    def widen_site(self, layer_id: str) -> WidenSite:
        """Where widening `layer_id` acts: the layer, the consumer of its activation, what lies between."""
        raise GrowthNotApplicable("widen", f"{type(self).__name__} declares no widen sites")

    def deepen_site(self, layer_id: str) -> DeepenSite:
        """Where a block inserted after `layer_id` goes: the output of the slot on its activation."""
        raise GrowthNotApplicable("deepen", f"{type(self).__name__} declares no deepen sites")

    def host_parameter_count(self) -> int:
        """Parameters of the host's own layers (seeds excluded)."""
        return sum(p.numel() for _, _, _, layer in self.host_layers() for p in layer.parameters())

    def parameter_count(self) -> int:
        """Every parameter now: host and seeds."""
        return sum(p.numel() for p in self.parameters())

    def topology(self) -> pb.HostTopology:
        """Layers (id, kind, width, depth, parameters, the growths the host allows there) and slots
        (id, layer, width, kind)."""
        topology = pb.HostTopology()
        for depth, (layer_id, kind, width, layer) in enumerate(self.host_layers()):
            topology.layers.add(
                layer_id=layer_id,
                kind=kind,
                width=width,
                depth=depth,
                parameter_count=sum(p.numel() for p in layer.parameters()),
                growth_operations=self._growth_operations(layer_id),
            )
        for slot in self.slots():
            topology.slots.add(slot_id=slot.slot_id, layer_id=slot.layer_id, width=slot.width, kind=slot.kind)
        return topology

    def _growth_operations(self, layer_id: str) -> list[int]:
        operations = []
        for operation, site in ((pb.SEED_OP_WIDEN, self.widen_site), (pb.SEED_OP_DEEPEN, self.deepen_site)):
            try:
                site(layer_id)
            except GrowthNotApplicable:
                continue
            operations.append(operation)
        return operations


class MLPHost(Host):
    """input -> [linear(width) -> ReLU -> slot] x depth -> linear(classes)."""

    slot_kind = "mlp"

    def __init__(
        self, input_size: int, num_classes: int, *, width: int = 12, depth: int = 2, with_slots: bool = True
    ) -> None:
        super().__init__()
        self.hidden = nn.ModuleList()
        self.slot_list = nn.ModuleList()
        self.with_slots = with_slots
        features = input_size
        for index in range(depth):
            self.hidden.append(nn.Linear(features, width))
            if with_slots:
                self.slot_list.append(
                    SeedSlot(f"h{index + 1}", width, "mlp", layer_id=f"fc{index + 1}", depth=index)
                )
            features = width
        self.head = nn.Linear(features, num_classes)

    def host_layers(self) -> list[tuple[str, str, int, nn.Module]]:
        layers: list[tuple[str, str, int, nn.Module]] = [
            (f"fc{i + 1}", "linear", layer.out_features, layer)
            for i, layer in enumerate(self.hidden)
            if isinstance(layer, nn.Linear)
        ]
        layers.append(("head", "linear", self.head.out_features, self.head))
        return layers

    def _hidden_index(self, layer_id: str, operation: str) -> int:
        names = [f"fc{i + 1}" for i in range(len(self.hidden))]
        if layer_id not in names:
            raise GrowthNotApplicable(operation, f"no hidden layer {layer_id!r}; hidden layers are {names}")
        return names.index(layer_id)

    def widen_site(self, layer_id: str) -> WidenSite:
        index = self._hidden_index(layer_id, "widen")
        producer = self.hidden[index]
        consumer = self.hidden[index + 1] if index + 1 < len(self.hidden) else self.head
        assert isinstance(producer, nn.Linear) and isinstance(consumer, nn.Linear)
        slot = self.slot_list[index] if self.with_slots else None
        assert slot is None or isinstance(slot, SeedSlot)
        return WidenSite(layer_id, producer, consumer, "relu", Bridge(), slot)

    def deepen_site(self, layer_id: str) -> DeepenSite:
        index = self._hidden_index(layer_id, "deepen")
        if not self.with_slots:
            raise GrowthNotApplicable("deepen", "a host without slots has no anchor for a block")
        layer = self.hidden[index]
        assert isinstance(layer, nn.Linear)
        return DeepenSite(layer_id, layer, self.slot_list[index], "linear", layer.out_features)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for `x` of shape [N, features] (or any shape that flattens to it)."""
        x = x.flatten(1)
        if self.with_slots:
            for layer, slot in zip(self.hidden, self.slot_list, strict=True):
                x = slot(torch.relu(layer(x)))
        else:
            for layer in self.hidden:
                x = torch.relu(layer(x))
        logits: Tensor = self.head(x)
        return logits


class _TwoConvHost(Host):
    """conv -> ReLU -> slot -> conv (stride 2) -> ReLU -> slot -> average pool to a few cells -> linear.

    The 2-D CNN and the 1-D CNN are this one network in two dimensions; a subclass names its
    convolution, pooling and shapes.
    """

    host_name = ""
    sample_dims = 0  # dimensions of one sample: [C, H, W] or [C, L]
    shape_requirement = ""
    conv: type[nn.Conv1d] | type[nn.Conv2d] = nn.Conv2d
    first_kernel = 3
    pooled = 0  # the pool's output side (per spatial dimension)
    block_kind = ""  # the deepen block's kind
    slot_ids = ("", "")

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        channels: tuple[int, int],
        with_slots: bool = True,
    ) -> None:
        super().__init__()
        if len(input_shape) != self.sample_dims:
            raise HostNotApplicable(self.host_name, f"{self.shape_requirement}, got shape {input_shape}")
        in_channels = input_shape[0]
        c1, c2 = channels
        self.with_slots = with_slots
        self.conv1 = self.conv(in_channels, c1, kernel_size=self.first_kernel, padding=self.first_kernel // 2)
        self.conv2 = self.conv(c1, c2, kernel_size=3, stride=2, padding=1)
        cells = self.pooled ** (self.sample_dims - 1)
        self.head = nn.Linear(c2 * cells, num_classes)
        first, second = self.slot_ids
        kind = self.slot_kind
        self.slot1 = SeedSlot(first, c1, kind, layer_id="conv1", depth=0) if with_slots else None
        self.slot2 = SeedSlot(second, c2, kind, layer_id="conv2", depth=1) if with_slots else None

    def host_layers(self) -> list[tuple[str, str, int, nn.Module]]:
        return [
            ("conv1", "conv", self.conv1.out_channels, self.conv1),
            ("conv2", "conv", self.conv2.out_channels, self.conv2),
            ("head", "linear", self.head.out_features, self.head),
        ]

    def widen_site(self, layer_id: str) -> WidenSite:
        if layer_id == "conv1":
            return WidenSite("conv1", self.conv1, self.conv2, "relu", Bridge(), self.slot1)
        if layer_id == "conv2":
            return WidenSite("conv2", self.conv2, self.head, "relu", Bridge(self.pooled), self.slot2)
        raise GrowthNotApplicable("widen", f"no widenable layer {layer_id!r}; choose conv1 or conv2")

    def deepen_site(self, layer_id: str) -> DeepenSite:
        anchors = {"conv1": (self.conv1, self.slot1), "conv2": (self.conv2, self.slot2)}
        if layer_id not in anchors:
            raise GrowthNotApplicable(
                "deepen", f"no layer {layer_id!r} to deepen after; choose conv1 or conv2"
            )
        layer, slot = anchors[layer_id]
        if slot is None:
            raise GrowthNotApplicable("deepen", "a host without slots has no anchor for a block")
        return DeepenSite(layer_id, layer, slot, self.block_kind, layer.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for `x` of shape [N, C, H, W] (2-D) or [N, C, L] (1-D)."""
        x = torch.relu(self.conv1(x))
        if self.slot1 is not None:
            x = self.slot1(x)
        x = torch.relu(self.conv2(x))
        if self.slot2 is not None:
            x = self.slot2(x)
        pool = (
            nn.functional.adaptive_avg_pool2d if self.sample_dims == 3 else nn.functional.adaptive_avg_pool1d
        )
        logits: Tensor = self.head(pool(x, self.pooled).flatten(1))
        return logits


class ConvHost(_TwoConvHost):
    """conv(c1) -> ReLU -> slot -> conv(c2, stride 2) -> ReLU -> slot -> 2x2 average pool -> linear.

    The head sees a 2x2 average of the last feature map rather than a global average: a global average
    throws away where strokes are, and the host then learns so slowly that it never plateaus within a
    run, so the controller never has a reason to grow it.
    """

    slot_kind = "conv"
    host_name = "cnn"
    sample_dims = 3
    shape_requirement = "needs image samples [C, H, W]"
    conv = nn.Conv2d
    first_kernel = 3
    pooled = POOLED_SIDE
    block_kind = "conv2d"
    slot_ids = ("c1", "c2")

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        channels: tuple[int, int] = (6, 12),
        with_slots: bool = True,
    ) -> None:
        super().__init__(input_shape, num_classes, channels=channels, with_slots=with_slots)


class Conv1dHost(_TwoConvHost):
    """conv(c1, 5) -> ReLU -> slot -> conv(c2, 3, stride 2) -> ReLU -> slot -> average pool to 4 cells ->
    linear, for sequences `[N, C, L]`.

    Like the 2-D CNN's, the head sees a coarse average pool (POOLED_LENGTH cells) rather than a global
    one, so where along the sequence a pattern occurs is not thrown away entirely.
    """

    slot_kind = "conv1d"
    host_name = "conv1d"
    sample_dims = 2
    shape_requirement = "needs sequence samples [C, L]"
    conv = nn.Conv1d
    first_kernel = 5
    pooled = POOLED_LENGTH
    block_kind = "conv1d"
    slot_ids = ("s1", "s2")

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        channels: tuple[int, int] = (4, 8),
        with_slots: bool = True,
    ) -> None:
        super().__init__(input_shape, num_classes, channels=channels, with_slots=with_slots)


class TokenEmbedding(nn.Module):
    """Token embedding plus a learned position embedding: `[N, T]` ids -> `[N, T, d_model]`."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(seq_len, d_model)

    def forward(self, ids: Tensor) -> Tensor:
        """The embedded sequence."""
        length = ids.shape[1]
        if length > self.positions.num_embeddings:
            raise HostNotApplicable(
                "transformer",
                f"sequence of {length} tokens, the host takes at most {self.positions.num_embeddings}",
            )
        where = torch.arange(length, device=ids.device)
        embedded: Tensor = self.tokens(ids) + self.positions(where)[None]
        return embedded


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention; returns what the block adds to the residual stream."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.attention = nn.MultiheadAttention(d_model, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        """`[N, T, d_model] -> [N, T, d_model]`."""
        normed = self.norm(x)
        attended: tuple[Tensor, Tensor | None] = self.attention(normed, normed, normed, need_weights=False)
        return attended[0]


def _channel_first(slot: SeedSlot | None, x: Tensor) -> Tensor:
    """`x` ([N, T, width]) through `slot`, which sees it channel-first ([N, width, T], a "conv1d" slot)."""
    if slot is None:
        return x
    return slot(x.transpose(1, 2)).transpose(1, 2)


class EncoderBlock(nn.Module):
    """x + attention(x), then x + proj(slot_f(relu(ff(norm(x))))), then slot_t: one pre-norm encoder block.

    Its slots see token activations channel-first (`[N, width, T]`), so the 1-D blueprints (convolutions
    along the sequence, channel gates, low-rank maps) fit them: `f{i}` sits on the feed-forward hidden
    layer, `t{i}` on the block's output.
    """

    def __init__(self, index: int, d_model: int, heads: int, ff_hidden: int, *, with_slots: bool) -> None:
        super().__init__()
        self.attention = SelfAttention(d_model, heads)
        self.norm = nn.LayerNorm(d_model)
        self.ff = nn.Linear(d_model, ff_hidden)
        self.proj = nn.Linear(ff_hidden, d_model)
        depth = 2 * (index - 1)
        self.hidden_slot = (
            SeedSlot(f"f{index}", ff_hidden, "conv1d", layer_id=f"ff{index}", depth=depth)
            if with_slots
            else None
        )
        self.output_slot = (
            SeedSlot(f"t{index}", d_model, "conv1d", layer_id=f"proj{index}", depth=depth + 1)
            if with_slots
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        """`[N, T, d_model] -> [N, T, d_model]`."""
        x = x + self.attention(x)
        hidden = _channel_first(self.hidden_slot, torch.relu(self.ff(self.norm(x))))
        x = x + self.proj(hidden)
        return _channel_first(self.output_slot, x)


class TransformerHost(Host):
    """A small Transformer encoder for token sequences `[N, T]`: embeddings -> encoder blocks -> mean over
    tokens -> linear.

    Widening `ff{i}` adds hidden units to block i's feed-forward layer (fan-out into `proj{i}`); deepening
    after `ff{i}` or `proj{i}` inserts a block on that slot's (channel-first) activation.
    """

    slot_kind = "conv1d"

    def __init__(
        self,
        seq_len: int,
        vocab_size: int,
        num_classes: int,
        *,
        d_model: int = 8,
        heads: int = 2,
        ff_hidden: int = 8,
        blocks: int = 1,
        with_slots: bool = True,
    ) -> None:
        super().__init__()
        if seq_len < 1 or vocab_size < 1:
            raise HostNotApplicable(
                "transformer", f"needs token sequences, got length {seq_len} and vocabulary {vocab_size}"
            )
        if d_model < 1 or heads < 1 or d_model % heads != 0:
            raise HostNotApplicable("transformer", f"d_model {d_model} must be a multiple of heads {heads}")
        if ff_hidden < 1 or blocks < 1:
            raise HostNotApplicable(
                "transformer", f"needs ff_hidden >= 1 and blocks >= 1, got {ff_hidden}, {blocks}"
            )
        self.with_slots = with_slots
        self.embed = TokenEmbedding(vocab_size, seq_len, d_model)
        self.blocks = nn.ModuleList(
            EncoderBlock(index + 1, d_model, heads, ff_hidden, with_slots=with_slots)
            for index in range(blocks)
        )
        self.head = nn.Linear(d_model, num_classes)

    def _blocks(self) -> list[EncoderBlock]:
        return [block for block in self.blocks if isinstance(block, EncoderBlock)]

    def host_layers(self) -> list[tuple[str, str, int, nn.Module]]:
        d_model = self.head.in_features
        layers: list[tuple[str, str, int, nn.Module]] = [("embed", "embedding", d_model, self.embed)]
        for index, block in enumerate(self._blocks(), start=1):
            layers += [
                (f"attn{index}", "attention", d_model, block.attention),
                (f"norm{index}", "norm", d_model, block.norm),
                (f"ff{index}", "linear", block.ff.out_features, block.ff),
                (f"proj{index}", "linear", block.proj.out_features, block.proj),
            ]
        layers.append(("head", "linear", self.head.out_features, self.head))
        return layers

    def _block(self, layer_id: str, operation: str, prefixes: tuple[str, ...]) -> tuple[str, EncoderBlock]:
        blocks = self._blocks()
        for prefix in prefixes:
            suffix = layer_id.removeprefix(prefix)
            if suffix != layer_id and suffix.isdigit() and 1 <= int(suffix) <= len(blocks):
                return prefix, blocks[int(suffix) - 1]
        names = [f"{prefix}{i}" for prefix in prefixes for i in range(1, len(blocks) + 1)]
        raise GrowthNotApplicable(operation, f"no layer {layer_id!r} here; choose one of {names}")

    def widen_site(self, layer_id: str) -> WidenSite:
        _, block = self._block(layer_id, "widen", ("ff",))
        return WidenSite(layer_id, block.ff, block.proj, "relu", Bridge(), block.hidden_slot)

    def deepen_site(self, layer_id: str) -> DeepenSite:
        prefix, block = self._block(layer_id, "deepen", ("ff", "proj"))
        slot = block.hidden_slot if prefix == "ff" else block.output_slot
        if slot is None:
            raise GrowthNotApplicable("deepen", "a host without slots has no anchor for a block")
        layer = block.ff if prefix == "ff" else block.proj
        return DeepenSite(layer_id, layer, slot, "conv1d", layer.out_features)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for token ids `x` of shape [N, T]."""
        hidden = self.embed(x)
        for block in self.blocks:
            hidden = block(hidden)
        logits: Tensor = self.head(hidden.mean(dim=1))
        return logits


# The width each host starts at by default: MLP units per layer, first conv channels, feed-forward units.
DEFAULT_WIDTHS = {"mlp": 4, "cnn": 4, "conv1d": 4, "transformer": 8}


def build_host(
    host: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    with_slots: bool = True,
    scale: float = 1.0,
    vocab_size: int = 0,
    width: int = 0,
) -> Host:
    """The host named `host` (one of HOST_KINDS) for this input; `scale` widens it (for static baselines).

    `width` (when > 0) replaces the host's default starting width before `scale`: the MLP's units per
    layer, the CNNs' first channels (the second conv has twice as many), the Transformer's feed-forward
    units. The transformer needs `vocab_size` (the token task's, `Dataset.vocab_size`).
    """
    if width < 0:
        raise HostNotApplicable(host, f"width must be >= 0 (0: the default), got {width}")
    # Narrow starts (4 to 8 units or channels): what the model becomes is decided by growth.
    first = DEFAULT_WIDTHS.get(host, 1)
    factor = scale * (width / first if width else 1.0)

    def scaled(units: int) -> int:
        return max(1, round(units * factor))

    if host == "mlp":
        return MLPHost(math.prod(input_shape), num_classes, width=scaled(4), with_slots=with_slots)
    if host == "cnn":
        return ConvHost(input_shape, num_classes, channels=(scaled(4), scaled(8)), with_slots=with_slots)
    if host == "conv1d":
        return Conv1dHost(input_shape, num_classes, channels=(scaled(4), scaled(8)), with_slots=with_slots)
    if host == "transformer":
        if vocab_size < 1 or len(input_shape) != 1:
            raise HostNotApplicable(
                "transformer",
                f"needs token ids [T] with a vocabulary (a token task), got samples {input_shape} "
                f"and vocabulary size {vocab_size}",
            )
        heads = 2
        return TransformerHost(
            input_shape[0],
            vocab_size,
            num_classes,
            d_model=heads * max(1, round(4 * scale)),
            heads=heads,
            ff_hidden=scaled(8),
            with_slots=with_slots,
        )
    raise HostNotApplicable(host, f"unknown host; choose one of {', '.join(HOST_KINDS)}")
