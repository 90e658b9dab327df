"""Policy payloads read without PyTorch: the bounded safetensors header reader and the payload check.

The CLI's inspection commands and Simic's state directory read a payload's header with these; loading the
weights is `GNNPolicy.load_state_bytes`'s job (it checks the same header first).
"""

from __future__ import annotations

import json

from esper.leyline import EsperError

_PICKLE_PROTOCOLS = range(2, 6)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive: a pickle inside a zip

# Bounds on a safetensors header, checked before anything else is read: a policy's header is some tens of
# kilobytes, nested three levels deep.
MAX_HEADER_BYTES = 1024 * 1024
MAX_HEADER_DEPTH = 8


class CheckpointIncompatible(EsperError):
    """A checkpoint was written for another architecture, schema or size (`hint`: what to do)."""

    def __init__(self, field: str, expected: str, found: str, *, hint: str = "") -> None:
        self.field = field
        self.expected = expected
        self.found = found
        self.hint = hint
        super().__init__(
            f"checkpoint {field} is {found!r}, this policy needs {expected!r}" + (f": {hint}" if hint else "")
        )


class SchemaMismatch(CheckpointIncompatible):
    """A checkpoint was built for another graph schema: its weights read other features and choose among
    other heads, so it is refused whole (retrain it, e.g. `esper simic train`, for this schema)."""

    def __init__(self, built_for: str, expected: str) -> None:
        self.built_for = built_for
        super().__init__(
            "schema_version",
            expected,
            built_for,
            hint=f"it was built for graph schema {built_for or 'unknown'}, this policy expects {expected}; "
            "train a policy for this schema",
        )


class PolicyUpdateRejected(EsperError):
    """An update was refused; `reason` is a short machine-readable code, `detail` says why."""

    def __init__(self, reason: str, detail: str, *, version: str = "", sequence: int = 0) -> None:
        self.reason = reason
        self.detail = detail
        self.version = version
        self.sequence = sequence
        super().__init__(
            f"policy update {version or '?'} (sequence {sequence}) rejected ({reason}): {detail}"
        )


def _json_depth(document: object) -> int:
    """How deeply `document` (parsed JSON) nests arrays and objects; iterative, so any depth is safe."""
    deepest = 0
    pending: list[tuple[object, int]] = [(document, 0)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, dict):
            children: list[object] = list(node.values())
        elif isinstance(node, list):
            children = list(node)
        else:
            continue
        deepest = max(deepest, depth + 1)
        pending.extend((child, depth + 1) for child in children)
    return deepest


def _bounded_json(text: bytes | str, what: str) -> object:
    """`text` parsed as JSON, nested at most `MAX_HEADER_DEPTH` deep; `CheckpointIncompatible` otherwise."""
    try:
        document: object = json.loads(text)
    except RecursionError as exc:
        raise CheckpointIncompatible(what, "JSON", "nested too deeply to parse") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
        raise CheckpointIncompatible(what, "JSON", f"unreadable ({exc})") from exc
    depth = _json_depth(document)
    if depth > MAX_HEADER_DEPTH:
        raise CheckpointIncompatible(what, f"JSON nested at most {MAX_HEADER_DEPTH} deep", f"depth {depth}")
    return document


def read_safetensors_header(payload: bytes) -> dict[str, str]:
    """The policy header in the metadata of a safetensors payload; `CheckpointIncompatible` for anything
    else.

    Only JSON is parsed, within bounds (`MAX_HEADER_BYTES`, `MAX_HEADER_DEPTH`): the safetensors header
    must be an object whose `__metadata__` maps strings to strings, and its `header` entry must be a JSON
    object of strings.
    """
    if len(payload) < 8:
        raise CheckpointIncompatible("payload", "safetensors bytes", f"{len(payload)} bytes")
    length = int.from_bytes(payload[:8], "little")
    if length == 0 or length > min(len(payload) - 8, MAX_HEADER_BYTES):
        raise CheckpointIncompatible(
            "header length", f"1..{min(len(payload) - 8, MAX_HEADER_BYTES)} bytes", str(length)
        )
    document = _bounded_json(payload[8 : 8 + length], "header")
    if not isinstance(document, dict):
        raise CheckpointIncompatible("header", "a JSON object", type(document).__name__)
    metadata = document.get("__metadata__")
    if not isinstance(metadata, dict):
        raise CheckpointIncompatible("__metadata__", "a JSON object", type(metadata).__name__)
    if not isinstance(metadata.get("header"), str):
        found = type(metadata.get("header")).__name__
        raise CheckpointIncompatible("__metadata__ header", "a JSON string", found)
    header = _bounded_json(metadata["header"], "policy header")
    if not isinstance(header, dict):
        raise CheckpointIncompatible("policy header", "a JSON object", type(header).__name__)
    for key, value in header.items():
        if not isinstance(value, str):
            raise CheckpointIncompatible(f"policy header {key!r}", "a string", type(value).__name__)
    return dict(header)


def read_payload_header(payload: bytes) -> dict[str, str]:
    """The JSON header of a safetensors payload; a pickle or anything else is `PolicyUpdateRejected`.

    Nothing here unpickles or executes anything: the bytes are inspected, and only a well-formed
    safetensors header is parsed (as JSON, bounded in size and depth: see `read_safetensors_header`).
    """
    if len(payload) >= 2 and payload[0] == 0x80 and payload[1] in _PICKLE_PROTOCOLS:
        raise PolicyUpdateRejected("pickle_payload", f"payload is a pickle (protocol {payload[1]})")
    if payload.startswith(_ZIP_MAGIC):
        raise PolicyUpdateRejected("pickle_payload", "payload is a torch.save archive (pickle inside)")
    try:
        return read_safetensors_header(payload)
    except CheckpointIncompatible as exc:
        raise PolicyUpdateRejected("not_safetensors", str(exc)) from exc
