"""The food-delivery showcase behind `conveyor demo`: see run.py for the processes, world.py for the
booking rules and why they hold under concurrency, verify.py for the checks made afterwards."""

from .run import run_demo
from .verify import Check, verify

__all__ = ["Check", "run_demo", "verify"]
