"""Helpers every part of Esper may use, importing nothing of Esper (DESIGN.md, "Who may import whom").

They live here rather than in Leyline when the root package needs them: `import esper` must not load
Leyline's protobuf bindings and settings.
"""
