"""The `esper` command line: a composition root of thin commands; runs are built by `esper.assembly`.

Importing it stays light (no PyTorch, no PyTorch Geometric): every command imports what it needs when
it runs.
"""

from esper.cli import inspect, run, serve, settings, simic  # noqa: F401 (each registers its commands)
from esper.cli.common import HALTED_EXIT, INTERRUPTED_EXIT, app
from esper.cli.settings import _settings_classes, env_example


def main() -> None:
    """Entry point of the `esper` script."""
    app()


__all__ = ["HALTED_EXIT", "INTERRUPTED_EXIT", "_settings_classes", "app", "env_example", "main"]
