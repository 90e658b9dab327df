"""Weatherlight: the supervisor of a node's long-lived services.

`Supervisor` runs each service of `WeatherlightSettings.services` (see `SERVICES`) as a child process,
restarts crashed ones with backoff, gives up on one that keeps crashing, stops them all on SIGTERM, SIGINT
or an emergency HALT, and keeps every service's state in a health file. `esper serve` is its command line.
"""

from esper.weatherlight.services import SERVICES, ServiceSpec
from esper.weatherlight.settings import WeatherlightSettings
from esper.weatherlight.supervisor import SupervisionOutcome, Supervisor

__all__ = ["SERVICES", "ServiceSpec", "SupervisionOutcome", "Supervisor", "WeatherlightSettings"]
