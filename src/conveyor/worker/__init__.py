"""The worker layer: the loop that claims, dispatches and settles (loop.py), its lanes and runner,
the outcome buffer, the keeper and watchdog, and the supervisor for several processes. It receives
a store, processors and a wake-up event; it never sees the App or SQL."""

from .crew import Crew
from .loop import Worker
from .supervisor import run_supervised

__all__ = ["Crew", "Worker", "run_supervised"]
