"""The food-delivery showcase behind `conveyor demo`: orders are rows of the application's own
table, processed in place and matched a batch at a time to free drivers. See session.py for the
processes, handlers.py for the matching and why the bookings hold under concurrency, verify.py for
the checks made afterwards, compare.py for `--compare`."""

from .compare import run_compare
from .run import run_demo
from .verify import Check, verify

__all__ = ["Check", "run_compare", "run_demo", "verify"]
