"""A training run under the scripted controller, as its own process (for kill-and-resume tests).

python -m tests.integration.run_worker RUN_DIR [--resume] [--delay SECONDS] [--bus-dir DIR]

With `--bus-dir`, the run listens for emergency HALTs on the embedded bus in DIR and exits with status
HALTED_EXIT when one stops it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from esper.kasmina import KasminaSettings
from esper.leyline import EsperSettings, load_settings
from esper.oona import OonaSettings
from esper.tolaria.emergency import BusEmergencyChannel
from esper.tolaria.run import RunConfig, run_experiment
from esper.tolaria.settings import TolariaSettings
from tests.integration.scripted import ScriptedController

SECRET = b"integration-secret-0123456789"
HALTED_EXIT = 3


def bus_settings(bus_dir: Path) -> tuple[EsperSettings, OonaSettings]:
    """The deployment settings of a test bus: the embedded file in `bus_dir`, the test secret."""
    esper = load_settings(
        EsperSettings, environ={}, data_dir=bus_dir, bus_url="", signing_secret=SECRET.decode()
    )
    return esper, load_settings(OonaSettings, environ={}, emergency_poll_ms=10)


def config(run_dir: Path, *, epochs: int = 8) -> RunConfig:
    """A short digits run with fast lifecycle settings."""
    return RunConfig(
        task="digits",
        host="mlp",
        policy="scripted",
        difficulty=0.5,
        run_dir=run_dir,
        catalogue_path=run_dir.parent / "urza.sqlite3",
        training_run_id="run-integration",
        tolaria=load_settings(TolariaSettings, environ={}, epochs=epochs, decision_interval=5, seed=3),
        kasmina=load_settings(
            KasminaSettings,
            environ={},
            min_training_steps=10,
            improvement_window=2,
            min_shadowing_steps=5,
            probation_steps=10,
            embargo_steps=15,
        ),
    )


def controller(delay_s: float = 0.0) -> ScriptedController:
    """Germinate h1 then h2; cull h2 while it blends; fossilise what passes probation."""
    return ScriptedController(
        SECRET,
        germinate=("h1", "h2"),
        blueprints={"h1": "mlp_small", "h2": "lowrank"},
        cull=("h2",),
        delay_s=delay_s,
    )


def main() -> None:
    """Run (or resume) one run directory."""
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--bus-dir", type=Path, default=None)
    args = parser.parse_args()
    channel = None
    if args.bus_dir is not None:
        esper, oona = bus_settings(args.bus_dir)
        channel = BusEmergencyChannel.open(
            esper, oona, training_run_id="run-integration", origin="run_worker", poll_interval_s=0.01
        )
    try:
        summary = run_experiment(
            config(args.run_dir),
            controller(args.delay),
            SECRET,
            resume=args.resume,
            progress=False,
            emergency=channel,
        )
    finally:
        if channel is not None:
            channel.close()
    if summary["status"] == "halted":
        raise SystemExit(HALTED_EXIT)


if __name__ == "__main__":
    main()
