"""The run assembly: the one recipe that builds a run from resolved settings (a composition root).

No subsystem imports this package; the CLI, Weatherlight and the public Python API build their runs
through it. Importing it loads PyTorch: the CLI imports it inside its commands.
"""

from esper.assembly.run import RunAssembly, RunInputs, resolve_config, run_directory
from esper.assembly.settings import RunSettings
from esper.assembly.start import require_writable
from esper.assembly.summary import RunSummary

__all__ = [
    "RunAssembly",
    "RunInputs",
    "RunSettings",
    "RunSummary",
    "require_writable",
    "resolve_config",
    "run_directory",
]
