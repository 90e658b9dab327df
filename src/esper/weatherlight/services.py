"""The services Weatherlight knows how to run: a name, a command line and what the service is for."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceSpec:
    """One long-lived service of a node: run as a child process with command line `argv`."""

    name: str
    argv: tuple[str, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a service needs a name")
        if not self.argv:
            raise ValueError(f"service {self.name!r} needs a command line")


def esper_command(*arguments: str) -> tuple[str, ...]:
    """The `esper` command line with `arguments`, run by this interpreter (no reliance on PATH), bound to
    the supervisor's life (see `esper.weatherlight.child`)."""
    return (sys.executable, "-c", "from esper.weatherlight.child import main; main()", *arguments)


SERVICES: dict[str, ServiceSpec] = {
    "simic": ServiceSpec(
        "simic",
        esper_command("simic", "serve"),
        "Simic's learner: trains on field reports from the bus and publishes policy updates",
    ),
}
"""Every service `WEATHERLIGHT_SERVICES` and `esper serve --service` may name."""


def actor_services(count: int) -> list[ServiceSpec]:
    """`count` of Simic's actors (`esper simic actor`), named actor-0 ... actor-<count - 1>: each its own
    service, restarted on its own when it crashes (it resumes its episode)."""
    return [
        ServiceSpec(
            f"actor-{index}",
            esper_command("simic", "actor", "--actor-id", f"actor-{index}"),
            "Simic's actor: runs episodes whose decisions and field reports feed the learner",
        )
        for index in range(count)
    ]
