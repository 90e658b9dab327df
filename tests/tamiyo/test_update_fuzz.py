"""Fuzzing the decoders of the policy-update path: each input is read or refused with its typed error.

`read_payload_header` returns a header of strings or raises `PolicyUpdateRejected`; `load_state_bytes`
loads weights or raises `CheckpointIncompatible` (leaving the weights as they were); `offer_bytes` accepts
or raises `PolicyUpdateRejected`. Nothing else may escape.
"""

from __future__ import annotations

import json
import struct
from functools import cache

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper.simic.updates import policy_payload
from esper.tamiyo.model.checkpoint import CheckpointIncompatible
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.runtime.updates import PolicyUpdateRejected, read_payload_header
from tests.tamiyo.packets import small_policy

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def framed(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


@cache
def valid_payload() -> bytes:
    return policy_payload(small_policy(), parent_version="p", sequence=1)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """Safetensors-shaped payloads whose header is JSON of every shape, some in the expected layout."""
    inner = draw(json_values)
    metadata = draw(st.sampled_from(["json", "raw", "none"]))
    if metadata == "json":
        document: object = {"__metadata__": {"header": json.dumps(inner)}}
    elif metadata == "raw":
        document = {"__metadata__": {"header": inner}}
    else:
        document = {"__metadata__": inner}
    encoded = json.dumps(document).encode()
    nesting = draw(st.integers(0, 3000))
    if nesting:
        encoded = b"[" * nesting + encoded + b"]" * draw(st.integers(0, nesting))
    return framed(encoded, draw(st.binary(max_size=16)))


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    """A valid payload with bytes flipped, cut short, or its length field changed."""
    payload = bytearray(valid_payload())
    kind = draw(st.sampled_from(["flip", "truncate", "length"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            index = draw(st.integers(0, len(payload) - 1))
            payload[index] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del payload[draw(st.integers(0, len(payload) - 1)) :]
    else:
        payload[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(payload)


def check_header(payload: bytes) -> None:
    try:
        header = read_payload_header(payload)
    except PolicyUpdateRejected as exc:
        assert exc.reason in {"not_safetensors", "pickle_payload"}
        return
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in header.items())


@given(st.binary(max_size=512))
def test_random_bytes_give_a_header_or_a_rejection(payload: bytes) -> None:
    check_header(payload)


@given(headers())
def test_json_headers_of_any_shape_give_a_header_or_a_rejection(payload: bytes) -> None:
    check_header(payload)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_payloads())
def test_damaged_weights_load_or_are_refused_leaving_the_policy_as_it_was(payload: bytes) -> None:
    check_header(payload)
    policy = load_target()
    before = {name: tensor.clone() for name, tensor in policy.module.state_dict().items()}
    version = policy.version
    try:
        policy.load_state_bytes(payload)
    except CheckpointIncompatible:
        assert policy.version == version
        after = policy.module.state_dict()
        assert all(torch.equal(before[name], after[name]) for name in before)


@cache
def load_target() -> GNNPolicy:
    return small_policy(seed=3)


def test_weights_cut_short_in_their_data_are_refused() -> None:
    policy = load_target()
    version = policy.version
    try:
        policy.load_state_bytes(valid_payload()[:-4])
    except CheckpointIncompatible as exc:
        assert exc.field == "weights"
    else:
        raise AssertionError("a truncated payload was loaded")
    assert policy.version == version


def test_weights_of_another_shape_are_refused_before_any_is_copied() -> None:
    from safetensors.torch import save

    policy = load_target()
    tensors = {name: tensor.clone() for name, tensor in policy.module.state_dict().items()}
    before = {name: tensor.clone() for name, tensor in tensors.items()}
    last = sorted(tensors)[-1]
    tensors = {name: torch.zeros_like(tensor) for name, tensor in tensors.items()}
    tensors[last] = torch.zeros(tensors[last].numel() + 1)
    header = json.dumps(policy.config.header())
    payload = bytes(save(tensors, metadata={"header": header}))
    try:
        policy.load_state_bytes(payload)
    except CheckpointIncompatible as exc:
        assert exc.field == f"tensor {last}"
    else:
        raise AssertionError("weights of another shape were loaded")
    after = policy.module.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # nothing half-applied
