"""Esper grows neural networks while they train.

Subsystems live in their own packages (docs/architecture.md, "Who may import whom"); the composition
roots are `esper.assembly` (the one recipe for a run), `esper.cli` and `esper.weatherlight`.
"""

__version__ = "0.1.0"
