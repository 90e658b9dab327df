"""Signing: valid, forged, tampered, replayed, stale, future-dated and wrong-key messages."""

from __future__ import annotations

import pytest

from esper.leyline import (
    FutureMessage,
    ManualClock,
    ReplayDetected,
    SignatureInvalid,
    SignatureVerifier,
    StaleMessage,
    pb,
    sign,
)
from esper.leyline.errors import ConfigurationError

SECRET = b"test-secret-0123456789abcdef"


def _command(clock: ManualClock) -> pb.AdaptationCommand:
    command = pb.AdaptationCommand(command_id="c1", command_type=pb.COMMAND_WAIT, issued_by="tamiyo")
    return sign(command, SECRET, clock=clock)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def verifier(clock: ManualClock) -> SignatureVerifier:
    return SignatureVerifier(SECRET, freshness_s=30.0, future_skew_s=2.0, clock=clock)


def test_valid_signature_is_accepted(clock: ManualClock, verifier: SignatureVerifier) -> None:
    command = _command(clock)
    assert command.signature and command.nonce and command.HasField("issued_at")
    assert verifier.verify(command) is command


def test_forged_signature_is_rejected(clock: ManualClock, verifier: SignatureVerifier) -> None:
    command = _command(clock)
    command.signature = "00" * 32
    with pytest.raises(SignatureInvalid):
        verifier.verify(command)


def test_unsigned_message_is_rejected(verifier: SignatureVerifier) -> None:
    with pytest.raises(SignatureInvalid, match="not signed"):
        verifier.verify(pb.AdaptationCommand(command_id="c"))


def test_tampered_payload_is_rejected(clock: ManualClock, verifier: SignatureVerifier) -> None:
    command = _command(clock)
    command.command_type = pb.COMMAND_PAUSE
    with pytest.raises(SignatureInvalid):
        verifier.verify(command)


def test_replayed_nonce_is_rejected(clock: ManualClock, verifier: SignatureVerifier) -> None:
    command = _command(clock)
    verifier.verify(command)
    with pytest.raises(ReplayDetected):
        verifier.verify(command)


def test_stale_message_is_rejected(clock: ManualClock, verifier: SignatureVerifier) -> None:
    command = _command(clock)
    clock.advance(31.0)
    with pytest.raises(StaleMessage):
        verifier.verify(command)


def test_future_dated_message_is_rejected(clock: ManualClock, verifier: SignatureVerifier) -> None:
    ahead = ManualClock(wall_ns=clock.wall_ns() + 10_000_000_000)
    with pytest.raises(FutureMessage):
        verifier.verify(_command(ahead))


def test_wrong_key_is_rejected(clock: ManualClock, verifier: SignatureVerifier) -> None:
    command = sign(
        pb.AdaptationCommand(command_id="c", command_type=pb.COMMAND_WAIT),
        b"another-secret-0123456789",
        clock=clock,
    )
    with pytest.raises(SignatureInvalid):
        verifier.verify(command)


def test_signature_covers_the_message_type(clock: ManualClock, verifier: SignatureVerifier) -> None:
    update = sign(pb.PolicyUpdate(policy_id="p"), SECRET, clock=clock)
    assert verifier.verify(update) is update


def test_short_secret_is_a_configuration_error(clock: ManualClock) -> None:
    with pytest.raises(ConfigurationError):
        sign(pb.AdaptationCommand(command_id="c"), b"short", clock=clock)


def test_forgotten_nonce_is_still_refused_as_stale(clock: ManualClock, verifier: SignatureVerifier) -> None:
    command = _command(clock)
    verifier.verify(command)
    clock.advance(40.0)
    with pytest.raises(StaleMessage):
        verifier.verify(command)


def test_a_command_of_an_earlier_life_is_refused_though_fresh_and_unseen(clock: ManualClock) -> None:
    """Issue 16.10: a restarted process restores the nonce ledger of its last checkpoint, which misses
    the commands applied after it; one of those, replayed within the freshness window, is refused
    because it was issued before this process began taking commands."""
    earlier = _command(clock)  # applied by the process that crashed, after its last checkpoint
    clock.advance(1.0)
    restarted = SignatureVerifier(
        SECRET, freshness_s=30.0, future_skew_s=2.0, clock=clock, not_before_ns=clock.wall_ns()
    )
    with pytest.raises(StaleMessage, match="earlier life"):
        restarted.verify(earlier)
    assert restarted.verify(_command(clock))  # its own controller's commands pass
