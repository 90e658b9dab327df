"""Esper grows neural networks while they train.

Subsystems live in their own packages (see DESIGN.md, "Who may import whom"); the composition roots are
`esper.cli` and `esper.weatherlight`.
"""

__version__ = "0.1.0"
