"""conveyor: asynchronous record processing for Python.

Looping workers retrieve the items that need processing, mark them in progress, process them with
your handler and mark them resolved, on one SQLite file or on PostgreSQL.
"""

from .app import App
from .errors import Backoff, BatchErrors, ConveyorError, Fail, ItemNotFound, LeaseLost, Retry, StoreError, UsageError
from .model import Item, QueueOptions, State

__version__ = "0.1.0"

__all__ = [
    "App",
    "Backoff",
    "BatchErrors",
    "ConveyorError",
    "Fail",
    "Item",
    "ItemNotFound",
    "LeaseLost",
    "QueueOptions",
    "Retry",
    "State",
    "StoreError",
    "UsageError",
    "__version__",
]
