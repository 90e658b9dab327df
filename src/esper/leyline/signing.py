"""Signing and verification of Leyline messages: the one way Esper authenticates a command or update.

The signature is HMAC-SHA256 over the message's deterministic serialisation with its `signature` field
cleared. Every signed message type carries `signature`, `nonce` and `issued_at`. Verification checks, in
order: the MAC (constant-time), freshness (neither too old nor too far in the future), and the nonce
ledger (a nonce is accepted once within its time-to-live). There is no unsigned mode.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import Message

from esper.leyline.clock import SYSTEM_CLOCK, Clock
from esper.leyline.errors import (
    ConfigurationError,
    FutureMessage,
    ReplayDetected,
    SignatureInvalid,
    StaleMessage,
)
from esper.leyline.messages import serialize

M = TypeVar("M", bound=Message)

MIN_SECRET_BYTES = 16
_SIGNED_FIELDS = ("signature", "nonce", "issued_at")


def _check_signable(message: Message) -> None:
    fields = message.DESCRIPTOR.fields_by_name
    missing = [name for name in _SIGNED_FIELDS if name not in fields]
    if missing:
        raise TypeError(f"{message.DESCRIPTOR.name} cannot be signed: it lacks {', '.join(missing)}")


def _check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"signing secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}"
        )


def canonical_bytes(message: Message) -> bytes:
    """The bytes the MAC covers: the deterministic serialisation without the signature."""
    unsigned = type(message)()
    unsigned.CopyFrom(message)
    unsigned.ClearField("signature")  # type: ignore[arg-type]
    return type(message).DESCRIPTOR.full_name.encode() + b"\x00" + serialize(unsigned)


def compute_signature(message: Message, secret: bytes) -> str:
    """Hex HMAC-SHA256 of the canonical bytes."""
    return hmac.new(secret, canonical_bytes(message), hashlib.sha256).hexdigest()


def sign(message: M, secret: bytes, *, clock: Clock = SYSTEM_CLOCK) -> M:
    """Stamp `nonce` and `issued_at` where unset, then set `signature`. Returns the same message."""
    _check_signable(message)
    _check_secret(secret)
    if not getattr(message, "nonce"):
        setattr(message, "nonce", secrets.token_hex(16))
    if not message.HasField("issued_at"):
        getattr(message, "issued_at").FromNanoseconds(clock.wall_ns())
    setattr(message, "signature", compute_signature(message, secret))
    return message


class NonceLedger:
    """Nonces seen recently, each remembered for `ttl_s` seconds, then forgotten.

    The TTL must cover the freshness window: a message older than that is rejected as stale anyway,
    so forgetting its nonce cannot let a replay through.
    """

    def __init__(self, ttl_s: float, max_entries: int = 1_000_000) -> None:
        if ttl_s <= 0:
            raise ValueError(f"nonce ttl must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def _prune(self, now: float) -> None:
        while self._expiry:
            expiry = next(iter(self._expiry.values()))
            if expiry > now and len(self._expiry) <= self.max_entries:
                break
            self._expiry.popitem(last=False)

    def seen(self, nonce: str, now: float) -> bool:
        """True if `nonce` is live in the ledger."""
        self._prune(now)
        return nonce in self._expiry

    def record(self, nonce: str, now: float) -> None:
        """Remember `nonce` until `now + ttl_s`."""
        self._expiry[nonce] = now + self.ttl_s
        self._expiry.move_to_end(nonce)
        self._prune(now)

    def entries(self, now: float) -> list[tuple[str, float]]:
        """The live nonces with their expiry (wall-clock seconds), oldest first: what survives a restart."""
        self._prune(now)
        return list(self._expiry.items())

    def merge(self, entries: Sequence[tuple[str, float]], now: float) -> None:
        """Remember `entries` (from `entries()`, possibly another process's) as well; each nonce keeps the
        later of its two expiries, and nothing already remembered is forgotten."""
        merged = dict(self._expiry)
        for nonce, expiry in entries:
            merged[nonce] = max(float(expiry), merged.get(nonce, float("-inf")))
        self._expiry = OrderedDict(sorted(merged.items(), key=lambda item: item[1]))
        self._prune(now)


class SignatureVerifier:
    """Verifies signed messages against one secret, one freshness window and one nonce ledger."""

    def __init__(
        self,
        secret: bytes,
        *,
        freshness_s: float = 60.0,
        future_skew_s: float = 5.0,
        clock: Clock = SYSTEM_CLOCK,
        ledger: NonceLedger | None = None,
        not_before_ns: int | None = None,
    ) -> None:
        """`not_before_ns`: messages issued before this instant are refused as stale, however fresh. A
        process that takes commands only from its own, in-process controller sets it to its start, so a
        command of an earlier life of the run (whose nonce a crash may have kept out of the saved ledger)
        is never accepted again."""
        _check_secret(secret)
        if freshness_s <= 0 or future_skew_s < 0:
            raise ValueError(
                f"freshness_s must be > 0 and future_skew_s >= 0 (got {freshness_s}, {future_skew_s})"
            )
        self._secret = secret
        self.freshness_s = freshness_s
        self.future_skew_s = future_skew_s
        self._clock = clock
        self._ledger = ledger or NonceLedger(ttl_s=freshness_s + future_skew_s)
        self._not_before_ns = not_before_ns

    @property
    def ledger(self) -> NonceLedger:
        """The nonces this verifier has accepted (a run saves them with its checkpoints)."""
        return self._ledger

    def now(self) -> float:
        """The verifier's clock, in the ledger's unit (wall-clock seconds)."""
        return self._clock.wall_ns() / 1e9

    def verify(self, message: M) -> M:
        """Return `message` if authentic, fresh and not replayed; raise a `SignatureError` otherwise."""
        _check_signable(message)
        name = message.DESCRIPTOR.name
        signature = getattr(message, "signature")
        if not signature:
            raise SignatureInvalid(name, "message is not signed")
        expected = compute_signature(message, self._secret)
        if not hmac.compare_digest(expected.encode(), str(signature).encode()):
            raise SignatureInvalid(name, "HMAC does not match")
        if not message.HasField("issued_at"):
            raise SignatureInvalid(name, "issued_at is missing")
        now_ns = self._clock.wall_ns()
        issued_ns = getattr(message, "issued_at").ToNanoseconds()
        age_s = (now_ns - issued_ns) / 1e9
        if age_s > self.freshness_s:
            raise StaleMessage(name, f"issued {age_s:.3f}s ago, window is {self.freshness_s}s")
        if age_s < -self.future_skew_s:
            raise FutureMessage(name, f"issued {-age_s:.3f}s in the future, skew is {self.future_skew_s}s")
        nonce = getattr(message, "nonce")
        if not nonce:
            raise SignatureInvalid(name, "nonce is missing")
        now = now_ns / 1e9
        if self._ledger.seen(nonce, now):
            raise ReplayDetected(name, f"nonce {nonce} was already used")
        if self._not_before_ns is not None and issued_ns < self._not_before_ns:
            raise StaleMessage(name, "issued before this process began taking commands (an earlier life)")
        self._ledger.record(nonce, now)
        return message
