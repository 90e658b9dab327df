"""A training run under the scripted controller, as its own process (for kill-and-resume tests).

python -m tests.integration.run_worker RUN_DIR [--resume] [--delay SECONDS] [--bus-dir DIR] [--policy gnn]

With `--policy gnn`, Tamiyo decides with the (seeded, untrained) GNN, sampling, under a generous step
deadline (a loaded test machine must not make a decision miss it).

With `--bus-dir`, the run listens for emergency HALTs on the embedded bus in DIR and exits with status
HALTED_EXIT when one stops it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from esper.assembly import RunAssembly, RunSettings, RunSummary
from esper.kasmina import KasminaSettings
from esper.leyline import EsperSettings, load_settings, pb
from esper.oona import OonaSettings
from esper.tamiyo import GNNPolicy, TamiyoService
from esper.tamiyo.settings import TamiyoSettings
from esper.tolaria.controller import BoundController, Controller
from esper.tolaria.run import RunConfig
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


def run_settings(data_dir: Path, **tamiyo: object) -> RunSettings:
    """A run's settings on the embedded bus in `data_dir` with the test secret, none from the environment."""
    return RunSettings.resolve(
        environ={},
        esper={"data_dir": data_dir, "bus_url": "", "signing_secret": SECRET.decode()},
        oona={"emergency_poll_ms": 10},
        tamiyo=tamiyo,
    )


def assembled_run(
    run_config: RunConfig,
    chosen: Controller,
    *,
    resume: bool = False,
    bus_dir: Path | None = None,
    close: Callable[[], None] | None = None,
    secret: bytes = SECRET,
) -> RunSummary:
    """Train `run_config` under `chosen` through the run assembly: isolated, or on the embedded bus in
    `bus_dir` (obeying its emergency HALTs). `close` is run with the assembly's other clean-ups; `secret`
    verifies the controller's commands."""
    settings = run_settings(bus_dir or run_config.run_dir.parent)
    with RunAssembly(
        settings, run_config, secret=secret, controller=chosen, resume=resume, deployment=bus_dir is not None
    ) as run:
        if close is not None:
            run.defer("close the controller", close)
        return run.train()


def config(run_dir: Path, *, epochs: int = 8, decision_lag_steps: int = 0) -> RunConfig:
    """A short digits run with fast lifecycle settings (decisions applied at once unless a lag is given)."""
    return RunConfig(
        task="digits",
        host="mlp",
        policy="scripted",
        difficulty=0.5,
        run_dir=run_dir,
        catalogue_path=run_dir.parent / "urza.sqlite3",
        training_run_id="run-integration",
        tolaria=load_settings(
            TolariaSettings,
            environ={},
            epochs=epochs,
            decision_interval=5,
            decision_lag_steps=decision_lag_steps,
            seed=3,
            # Every epoch, as before the clock-based cadence: the kill tests wait for a mid-run checkpoint.
            checkpoint_every_epochs=1,
            # The machine's free memory differs from run to run: the runs compared must not read it.
            hardware_context=False,
        ),
        kasmina=fast_kasmina(),
    )


def fast_kasmina() -> KasminaSettings:
    """Lifecycle dwell times short enough for a seed to settle within a few epochs of a small task."""
    return load_settings(
        KasminaSettings,
        environ={},
        min_training_steps=10,
        improvement_window=2,
        min_shadowing_steps=5,
        probation_steps=10,
        embargo_steps=15,
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


def gnn_controller(delay_s: float = 0.0) -> tuple[Controller, Callable[[], None]]:
    """Tamiyo with the sampling GNN, bound for Tolaria, and the function that closes its service."""
    settings = load_settings(TamiyoSettings, environ={}, step_timeout_ms=60_000.0, gnn_greedy=False)
    policy = GNNPolicy(settings)
    service = TamiyoService(settings, policy, SECRET)

    def start(packet: pb.SystemStatePacket) -> None:
        if delay_s:
            time.sleep(delay_s)  # lets a test kill the run mid-way; changes no state
        service.submit(packet)

    bound = BoundController(
        decide=service.evaluate_step,
        save=policy.state,
        load=policy.restore,
        rehearse=service.prepare,
        start=start,
        finish=service.collect,
    )
    return bound, service.close


def main() -> None:
    """Run (or resume) one run directory."""
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--bus-dir", type=Path, default=None)
    parser.add_argument("--policy", choices=("scripted", "gnn"), default="scripted")
    args = parser.parse_args()
    close: Callable[[], None] | None = None
    if args.policy == "gnn":
        chosen, close = gnn_controller(args.delay)
    else:
        chosen = controller(args.delay)
    summary = assembled_run(
        config(args.run_dir, decision_lag_steps=2),  # kill-and-resume with decisions in flight
        chosen,
        resume=args.resume,
        bus_dir=args.bus_dir,
        close=close,
    )
    if summary.status == "halted":
        raise SystemExit(HALTED_EXIT)


if __name__ == "__main__":
    main()
