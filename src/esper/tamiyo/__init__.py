"""Tamiyo: the controller that decides, from a graph view of a training run, what to grow and when.

The public surface is deliberately small: the service and the policy classes. Everything else in this
package is internal and may change.
"""

from esper.tamiyo.service import TamiyoService

__all__ = ["TamiyoService"]
