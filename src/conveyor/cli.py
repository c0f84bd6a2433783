"""The `conveyor` command: a thin shell over App. A user's mistake ends in one line and exit code 2."""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import json
import logging
import os
import shlex
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .app import App, check_priority, check_queue_name
from .codec import MAX_DEPTH, check_text, encode_payload
from .durations import format_age, parse_duration
from .errors import ConveyorError, UsageError, shown
from .model import STATES, Item, NewItem, error_headline

err_console = Console(stderr=True)
SUBMIT_CHUNK = 5000


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # the message as is
    sys.exit(code)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn conveyor's usage errors (and a few OS ones) into one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            fail(str(exc))
        except ConveyorError as exc:
            fail(str(exc), code=1)
        except OSError as exc:
            fail(str(exc))

    return wrapper


class JSONLines(logging.Formatter):
    """One JSON object per log line: time (UTC, ISO 8601), level, logger, message, and the fields a
    worker's lines carry (worker, queue, item_ids; see worker.logs) as keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().removesuffix(getattr(record, "fields_text", ""))  # they are keys here
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": message,
        }
        for field in ("worker", "queue", "item_ids"):
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


_LOGGING = {"level": "info", "format": "text"}  # as set last, by the options before or after the command


def setup_logging(level: str | None = None, fmt: str | None = None) -> None:
    """(Re)configure the root logger; what is not given stays as it was (--log-level and --log-format
    may come before the command, after it, or both)."""
    state = _LOGGING
    state["level"] = level or state["level"]
    state["format"] = fmt or state["format"]
    handler: logging.Handler
    if state["format"] == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JSONLines())
    else:
        handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=False, log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=state["level"].upper(), handlers=[handler], force=True)


LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)
LOG_FORMATS = click.Choice(["text", "json"], case_sensitive=False)
LOG_FORMAT_HELP = "text (default) or json: one JSON object per line, with worker, queue and item_ids as keys."
DB_HELP = ("Database URL: sqlite:///file.db or postgresql://user@host/db. Default: the app's own URL (worker), "
           "a fresh file (demo), else $CONVEYOR_DATABASE_URL, else sqlite:///conveyor.db.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", "db", default=None, metavar="URL", help=DB_HELP)
@click.option("--log-level", default="info", show_default=True, type=LOG_LEVELS)
@click.option("--log-format", default="text", show_default=True, type=LOG_FORMATS, help=LOG_FORMAT_HELP)
@click.version_option(package_name="conveyor")
@click.pass_context
def main(ctx: click.Context, db: str | None, log_level: str, log_format: str) -> None:
    """conveyor: asynchronous record processing. Workers claim items, process them with your
    handler, and resolve them, never twice. --db, --log-level and --log-format go before or after
    the command."""
    setup_logging(log_level, log_format)
    ctx.obj = {"db": db}


def global_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--db, --log-level and --log-format, accepted after the subcommand too (`conveyor status --db URL`)."""

    @click.option("--db", "_db", default=None, metavar="URL", help=DB_HELP)
    @click.option("--log-level", "_log_level", default=None, type=LOG_LEVELS, help="debug, info (default), warning or error.")
    @click.option("--log-format", "_log_format", default=None, type=LOG_FORMATS, help=LOG_FORMAT_HELP)
    @functools.wraps(fn)
    def wrapper(*args: Any, _db: str | None, _log_level: str | None, _log_format: str | None, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        if _db is not None:
            ctx.obj["db"] = _db
        if _log_level is not None or _log_format is not None:
            setup_logging(_log_level, _log_format)
        return fn(*args, **kwargs)

    return wrapper


def app_from(ctx: click.Context, read_only: bool = False) -> App:
    """The App for a command: --db if given, else $CONVEYOR_DATABASE_URL, else sqlite:///conveyor.db.
    Read-only commands never create or migrate a database."""
    return App(ctx.obj["db"], read_only=read_only)


# -- submit ---------------------------------------------------------------------------------------
def read_items(stream: IO[bytes], name: str, queue: str, key_field: str | None, dedup_field: str | None,
               priority: int) -> Iterator[NewItem]:
    """One NewItem per non-blank line of JSON-lines bytes; a bad line is a UsageError naming it."""
    for lineno, raw in enumerate(stream, 1):
        where = f"{name} line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{where}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at column {exc.start + 1})") from None
        if not line.strip():
            continue
        try:
            payload = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise UsageError(f"{where}: the JSON nests too deep to read (payloads may nest {MAX_DEPTH} levels)") from None
        key = dedup = None
        for field, target in ((key_field, "key"), (dedup_field, "dedup")):
            if field is None:
                continue
            if not isinstance(payload, dict) or field not in payload or payload[field] in (None, ""):
                raise UsageError(f"{where}: field {shown(field)} (given by --{target}-field) is missing")
            value = payload[field]
            if isinstance(value, (dict, list, bool)):
                raise UsageError(f"{where}: field {shown(field)} must be a string or number to serve as {target} key")
            text = check_text(str(value), f"{where}: field {shown(field)}")
            if target == "key":
                key = text
            else:
                dedup = text
        yield NewItem(queue, encode_payload(payload, where), key, dedup, None, priority)


@main.command()
@global_options
@click.argument("queue")
@click.option("--file", "file", default="-", show_default=True, metavar="ITEMS.jsonl|-",
              help="One JSON payload per line; '-' reads standard input.")
@click.option("--key-field", default=None, help="Payload field whose value is the ordering key.")
@click.option("--dedup-field", default=None, help="Payload field whose value is the dedup key.")
@click.option("--priority", default=0, show_default=True, type=int, help="Priority of every item (higher first).")
@click.pass_context
@friendly
def submit(ctx: click.Context, queue: str, file: str, key_field: str | None, dedup_field: str | None, priority: int) -> None:
    """Submit items from a JSON-lines file: all or nothing. A bad line stops the import with its
    line number, and nothing from the file is stored."""
    check_queue_name(queue)
    check_priority(priority, "--priority")
    stream: IO[bytes]
    if file == "-":
        stream, name, total = sys.stdin.buffer, "stdin", None
    else:
        try:
            stream = open(file, "rb")  # noqa: SIM115 (closed by the caller, after the import)
        except OSError as exc:
            raise UsageError(f"cannot read {shown(file, 400)}: {exc.strerror}") from None
        name = file
        total = os.path.getsize(file)
    app = app_from(ctx)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=err_console, transient=True, disable=not err_console.is_terminal)
    started = time.perf_counter()
    with progress, stream:
        task = progress.add_task(f"reading {name}", total=total)
        items: list[NewItem] = []
        size = 0
        for item in read_items(stream, name, queue, key_field, dedup_field, priority):
            items.append(item)
            size += len(item.payload_json) + 1
            if len(items) % 1000 == 0:
                progress.update(task, completed=size)
        progress.update(task, completed=total or size)
        store_task = progress.add_task(f"storing into {queue!r}", total=len(items))
        ids = StoredIds()
        stored = app.submit_items(items, chunk=SUBMIT_CHUNK, progress=lambda n: progress.advance(store_task, n),
                                  on_ids=ids.add)
    elapsed = time.perf_counter() - started
    skipped = len(items) - stored
    note = f", {skipped} skipped as duplicates" if skipped else ""
    click.echo(f"submitted {stored} item(s) to {queue!r}{note} in {elapsed:.2f}s{ids.describe()}")


class StoredIds:
    """The ids a submit stored, as few as it takes to name them: all of up to SHOW_IDS, else the
    first and the last."""

    SHOW_IDS = 10

    def __init__(self) -> None:
        self.first: list[int] = []
        self.last: int | None = None
        self.count = 0

    def add(self, ids: list[int | None]) -> None:
        for i in ids:
            if i is not None:
                if len(self.first) < self.SHOW_IDS:
                    self.first.append(i)
                self.last, self.count = i, self.count + 1

    def describe(self) -> str:
        if not self.count:
            return ""
        if self.count <= self.SHOW_IDS:
            return f": id{'s' if self.count > 1 else ''} {', '.join(map(str, self.first))}"
        return f": ids {self.first[0]} (first) to {self.last} (last)"


# -- worker ---------------------------------------------------------------------------------------
def load_app(spec: str) -> App:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{spec!r} is not MODULE:APP (for example: myproject.tasks:app)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import module {module_name!r} (from {spec!r}): {exc}") from None
    except Exception as exc:  # noqa: BLE001 (whatever the user's module raised: one line, exit 2)
        raise UsageError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, App):
        raise UsageError(f"{spec!r} is a {type(obj).__name__}, not a conveyor.App")
    obj.spec = spec
    return obj


@main.command()
@global_options
@click.argument("app_spec", metavar="MODULE:APP")
@click.option("--queue", "queues", multiple=True, help="Queue to work on (repeatable); default: all the app's processors.")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes, under a supervisor that restarts crashed ones.")
@click.option("--stop-when-empty", is_flag=True, help="Exit once the queues have nothing pending or in progress.")
@click.option("--shutdown-timeout", default=30.0, show_default=True, type=float,
              help="Seconds to let running handlers finish after SIGINT/SIGTERM.")
@click.option("--prune-after", default=None, metavar="AGE",
              help="Also delete the queues' resolved, dead and cancelled items this old (e.g. 7d).")
@click.pass_context
@friendly
def worker(ctx: click.Context, app_spec: str, queues: tuple[str, ...], processes: int, stop_when_empty: bool,
           shutdown_timeout: float, prune_after: str | None) -> None:
    """Run workers for MODULE:APP until stopped (Ctrl-C / SIGTERM finish in-flight work first)."""
    app = load_app(app_spec)
    app.processors_for(queues)  # an unknown queue fails before anything is said
    if ctx.obj["db"] and ctx.obj["db"] != app.url:
        # only an explicit --db overrides the app's own URL ($CONVEYOR_DATABASE_URL is the App's default)
        own = app.describe_database()
        app.close()
        app.url = ctx.obj["db"]
        app.store  # noqa: B018 - a bad URL fails here, before the override is announced
        logging.getLogger("conveyor").warning("--db overrides the app's database: using %s, not %s",
                                              app.describe_database(), own)
    app.run_worker(list(queues) or None, processes=processes, stop_when_empty=stop_when_empty,
                   shutdown_timeout=shutdown_timeout,
                   prune_after=None if prune_after is None else parse_duration(prune_after, "--prune-after"))


# -- serve ----------------------------------------------------------------------------------------
@main.command()
@global_options
@click.argument("app_spec", metavar="[MODULE:APP]", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", "tokens", multiple=True, metavar="T", help="A read-write API token (repeatable).")
@click.option("--read-token", "read_tokens", multiple=True, metavar="T", help="A read-only API token (repeatable).")
@click.option("--insecure", is_flag=True, help="Serve a non-loopback --host without any token.")
@click.option("--max-body", default=1024 * 1024, show_default=True, type=click.IntRange(1), metavar="BYTES",
              help="Larger request bodies are refused (413).")
@click.pass_context
@friendly
def serve(ctx: click.Context, app_spec: str | None, host: str, port: int, tokens: tuple[str, ...],
          read_tokens: tuple[str, ...], insecure: bool, max_body: int) -> None:
    """The HTTP API (/v1), the dashboard (/) and /metrics in one process. With MODULE:APP it serves
    the app's queues only; without, every queue the database holds. Tokens: --token, --read-token,
    or $CONVEYOR_API_TOKENS ("write:T1,read:T2"; a bare token is read-write)."""
    try:
        from .web.auth import ENV, Tokens
        from .web.server import serve as run_server
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    tokens_set = Tokens.from_options(tokens, read_tokens, os.environ.get(ENV))
    if app_spec:
        app = load_app(app_spec)
        if ctx.obj["db"]:
            app.close()
            app.url = ctx.obj["db"]
    else:
        app = app_from(ctx)
    run_server(app, known_queues=app_spec is not None, host=host, port=port, tokens=tokens_set, insecure=insecure,
               max_body=max_body)


# -- adopt ----------------------------------------------------------------------------------------
@main.command()
@global_options
@click.argument("app_spec", metavar="MODULE:APP")
@click.option("--table", default=None, help="Only this table (default: every @app.rows table of the app).")
@click.option("--apply", "do_apply", is_flag=True, help="Run the statements (each table's in one transaction).")
@click.option("--undo", is_flag=True, help="Remove what adopt added (columns, indexes, trigger), and run that.")
@click.pass_context
@friendly
def adopt(ctx: click.Context, app_spec: str, table: str | None, do_apply: bool, undo: bool) -> None:
    """Print what the app's rows processors need in their tables (columns beside each row, partial
    indexes, on PostgreSQL a wake-up trigger); --apply runs it, --undo removes it."""
    if do_apply and undo:
        raise UsageError("--apply and --undo exclude each other: --undo runs the removal by itself")
    app = load_app(app_spec)
    if ctx.obj["db"]:
        app.close()
        app.url = ctx.obj["db"]
    plans = app.adopt(table, apply=do_apply, undo=undo)
    where = app.describe_database()
    for name, statements in plans.items():
        if not statements:
            click.echo(f"-- table {name!r} in {where}: adopted already, nothing to do")
            continue
        verb = "removed from" if undo else ("applied to" if do_apply else "needed by")
        click.echo(f"-- {len(statements)} statement(s) {verb} table {name!r} in {where}")
        for sql in statements:
            click.echo(sql.strip() + ";")
    if not (do_apply or undo) and any(plans.values()):
        click.echo(f"-- run again with --apply to apply: conveyor adopt {app_spec}"
                   + (f" --table {table}" if table else "") + " --apply")


# -- status ---------------------------------------------------------------------------------------
def status_table(stats: dict[str, dict[str, Any]], where: str) -> Table:
    table = Table(title=f"conveyor · {where}", title_justify="left")
    table.add_column("queue", style="bold")
    for state in STATES:
        table.add_column(state.replace("_", " "), justify="right")
    table.add_column("oldest pending", justify="right")
    table.add_column("resolved/min", justify="right")
    for queue, s in stats.items():
        # a table processed in place: its rows of the application's own statuses show as cancelled
        # (conveyor leaves them alone), and its name says it is a table
        counts = {**s, "cancelled": s.get("other", s["cancelled"])}
        table.add_row(f"{queue} (table)" if s.get("rows") else queue, *[f"{counts[state]:,}" for state in STATES],
                      format_age(s["oldest_pending_seconds"]), f"{s['resolved_last_minute']:,}")
    if not stats:
        table.add_row("(no items yet)", *[""] * (len(STATES) + 2))
    notes = [note for queue, s in stats.items() for note in flow_notes(queue, s)]
    if notes:
        table.caption = "\n".join(notes)
        table.caption_justify = "left"
    return table


def flow_notes(queue: str, s: dict[str, Any]) -> list[str]:
    """What holds a queue back, for status: paused, held by a Backoff, limited."""
    notes = []
    if s.get("paused"):
        notes.append(f"{queue}: paused (conveyor resume {queue})")
    if s.get("held_until"):
        notes.append(f"{queue}: held by a Backoff for {format_age(s['held_until'] - time.time())}")
    for field, what in (("paused_keys", "paused keys"), ("held_keys", "keys held by a Backoff")):
        if s.get(field):
            keys = s[field]
            notes.append(f"{queue}: {what}: {', '.join(keys[:10])}" + (f" and {len(keys) - 10} more" if len(keys) > 10 else ""))
    if s.get("limits"):
        notes.append(f"{queue}: limited: " + ", ".join(f"{k}={v}" for k, v in s["limits"].items()))
    return notes


def schedules_table(app: App, queues: list[str] | None) -> Table | None:
    """The periodic schedules the database holds (of these queues): each one's last and next tick.
    A next tick long past means no worker keeps the schedule now."""
    now, states = app.schedules()
    states = [s for s in states if queues is None or s.queue in queues]
    if not states:
        return None
    table = Table(title="periodic schedules", title_justify="left")
    for column in ("queue", "name", "schedule", "last tick (UTC)", "next tick (UTC)"):
        table.add_column(column, style="bold" if column == "queue" else None)
    table.add_column("next in", justify="right")

    def moment(seconds: float | None) -> str:
        return "-" if seconds is None else short_time(dt.datetime.fromtimestamp(seconds, dt.UTC))

    for s in states:
        due = "-" if s.next_tick is None else (
            format_age(s.next_tick - now) if s.next_tick >= now else f"overdue {format_age(now - s.next_tick)}")
        table.add_row(s.queue, s.name, s.schedule, moment(s.last_tick), moment(s.next_tick), due)
    return table


def status_view(app: App, stats: dict[str, dict[str, Any]], queues: list[str] | None, where: str) -> RenderableType:
    table = status_table(stats, where)
    schedules = schedules_table(app, queues)
    return table if schedules is None else Group(table, schedules)


@main.command()
@global_options
@click.option("--json", "as_json", is_flag=True, help="Print the stats as JSON (the same mapping as app.stats()).")
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C (with --json: one JSON line a second).")
@click.option("--queue", "queues", multiple=True, help="Only these queues.")
@click.argument("app_spec", metavar="[MODULE:APP]", required=False)
@click.pass_context
@friendly
def status(ctx: click.Context, as_json: bool, watch: bool, queues: tuple[str, ...], app_spec: str | None) -> None:
    """Counts by state, oldest pending age and throughput per queue; the periodic schedules. With
    MODULE:APP, each queue's limits too (they live in the app's code, not the database)."""
    if app_spec:
        app = load_app(app_spec)
        app.close()
        app.read_only = True
        if ctx.obj["db"]:
            app.url = ctx.obj["db"]
    else:
        app = app_from(ctx, read_only=True)
    for queue in queues:
        check_queue_name(queue)
    asked = list(queues) or None
    stats = app.stats(asked)
    empty = [q for q in queues if not stats[q]["total"]]
    if empty:
        raise UsageError(f"queue {shown(empty[0])} has no items in {app.describe_database()}")
    where = app.describe_database()
    if as_json and not watch:
        click.echo(json.dumps(stats, indent=2))
        return
    if as_json:  # --json --watch: one JSON document per line, every second
        click.echo(json.dumps(stats))
        for _ in every_second_until_stopped():
            click.echo(json.dumps(app.stats(asked)))
        return
    console = Console() if sys.stdout.isatty() else Console(width=120)
    if not watch:
        console.print(status_view(app, stats, asked, where))
        return
    with Live(status_view(app, stats, asked, where), console=console, auto_refresh=False) as live:
        for _ in every_second_until_stopped():
            live.update(status_view(app, app.stats(asked), asked, where), refresh=True)


def every_second_until_stopped() -> Iterator[None]:
    """Yield once a second until SIGINT or SIGTERM, through handlers installed here: a process
    started without job control (a shell's background job, as CI may run) inherits SIGINT ignored,
    and Python's default KeyboardInterrupt never comes."""
    stopped: list[int] = []
    handle = lambda signum, frame: stopped.append(signum)  # noqa: E731
    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        next_at = time.monotonic() + 1
        while not stopped:
            time.sleep(min(0.1, max(0.0, next_at - time.monotonic())))
            if not stopped and time.monotonic() >= next_at:
                next_at += 1
                yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- operators ------------------------------------------------------------------------------------
@main.command()
@global_options
@click.argument("queue")
@click.option("--key", default=None, help="Only this key of the queue (one tenant, one restaurant).")
@click.pass_context
@friendly
def pause(ctx: click.Context, queue: str, key: str | None) -> None:
    """Claim nothing more of QUEUE (or of one key of it) on any worker; running items finish."""
    app_from(ctx).pause(queue, key)
    click.echo(f"paused {queue!r}" + (f" key {key!r}" if key is not None else "") + ": nothing more of it starts "
               f"until `conveyor resume {queue}" + (f" --key {key}" if key is not None else "") + "`")


@main.command()
@global_options
@click.argument("queue")
@click.option("--key", default=None, help="Only this key of the queue.")
@click.pass_context
@friendly
def resume(ctx: click.Context, queue: str, key: str | None) -> None:
    """Let workers claim QUEUE (or one key of it) again after `conveyor pause`."""
    was = app_from(ctx).resume(queue, key)
    what = f"{queue!r}" + (f" key {key!r}" if key is not None else "")
    click.echo(f"resumed {what}" if was else f"{what} was not paused")


@main.command()
@global_options
@click.argument("queue")
@click.pass_context
@friendly
def retry(ctx: click.Context, queue: str) -> None:
    """Send a queue's dead and cancelled items back to pending, with fresh attempts."""
    n = app_from(ctx).requeue(queue)
    click.echo(f"{n} item(s) of {queue!r} sent back to pending")


@main.command()
@global_options
@click.argument("item_id", type=int)
@click.pass_context
@friendly
def cancel(ctx: click.Context, item_id: int) -> None:
    """Cancel a pending or in-progress item."""
    app_from(ctx).cancel(item_id)
    click.echo(f"item {item_id} cancelled")


@main.command()
@global_options
@click.argument("queue")
@click.option("--older-than", required=True, help="Age of finished items to delete, e.g. 7d, 12h, 30m.")
@click.pass_context
@friendly
def purge(ctx: click.Context, queue: str, older_than: str) -> None:
    """Delete a queue's resolved, dead and cancelled items finished longer ago than --older-than."""
    n = app_from(ctx).purge(queue, parse_duration(older_than, "--older-than"))
    click.echo(f"{n} finished item(s) of {queue!r} purged")


def utc(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(dt.UTC).isoformat(timespec="milliseconds")


def item_json(item: Item) -> dict[str, Any]:
    """An item as `items --json` and `show --json` print it: every field, times in ISO 8601 UTC."""
    return {
        "id": item.id, "queue": item.queue, "state": str(item.state), "key": item.key, "dedup_key": item.dedup_key,
        "priority": item.priority, "attempts": item.attempts, "max_attempts": item.max_attempts,
        "run_at": utc(item.run_at), "created_at": utc(item.created_at), "finished_at": utc(item.finished_at),
        "lease_owner": item.lease_owner, "lease_expires_at": utc(item.lease_expires_at),
        "last_error": item.last_error, "payload": item.payload,
    }


def short_time(moment: dt.datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@main.command()
@global_options
@click.argument("queue")
@click.option("--state", default=None, metavar="STATE", help=f"Only items in this state: {', '.join(STATES)}.")
@click.option("--key", default=None, help="Only items with this ordering key.")
@click.option("--limit", default=50, show_default=True, type=int, help="Items per page.")
@click.option("--before", "before", default=None, type=int, metavar="ID", help="The page of items older than this id.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array of whole items (payload and full last_error).")
@click.pass_context
@friendly
def items(ctx: click.Context, queue: str, state: str | None, key: str | None, limit: int, before: int | None,
          as_json: bool) -> None:
    """A queue's items, newest first, a page at a time (--before ID for the next one)."""
    app = app_from(ctx, read_only=True)
    page = app.items(queue, state=state, key=key, before_id=before, limit=limit)
    if as_json:
        click.echo(json.dumps([item_json(it) for it in page], indent=2, ensure_ascii=False))
        return
    console = Console() if sys.stdout.isatty() else Console(width=160)
    which = " · ".join([queue] + [f"state {state}"] * bool(state) + [f"key {key}"] * (key is not None))
    if not page:
        console.print(Text(f"no items: {which}" + (f" · older than id {before}" if before is not None else "")))
        return
    table = Table(title=Text(f"{which} · newest first"), title_justify="left")
    table.add_column("id", justify="right")
    table.add_column("state")
    table.add_column("key")
    table.add_column("attempts", justify="right")
    table.add_column("run_at (UTC)")
    table.add_column("last error", overflow="ellipsis", no_wrap=True, max_width=70)
    for it in page:
        table.add_row(str(it.id), str(it.state), Text(it.key or "-"), str(it.attempts), short_time(it.run_at),
                      Text(error_headline(it.last_error)))
    console.print(table)
    last = page[-1].id
    if len(page) == limit and app.items(queue, state=state, key=key, before_id=last, limit=1):
        again = [f"--state {state}"] * bool(state) + [f"--key {shlex.quote(key or '')}"] * (key is not None)
        again += [f"--limit {limit}"] * (limit != 50)
        console.print(f"more: conveyor items {shlex.quote(queue)} {' '.join(again + [f'--before {last}'])}",
                      highlight=False, soft_wrap=True)


@main.command()
@global_options
@click.argument("item_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the item as one JSON object.")
@click.pass_context
@friendly
def show(ctx: click.Context, item_id: int, as_json: bool) -> None:
    """One item whole: its fields, its payload and its last error (the full traceback)."""
    app = app_from(ctx, read_only=True)
    item = app.get(item_id)
    why = app.why(item_id)
    if as_json:
        click.echo(json.dumps({**item_json(item), "why": why} if why else item_json(item), indent=2, ensure_ascii=False))
        return
    attempts = f"{item.attempts}" + (f" of {item.max_attempts}" if item.max_attempts else "")
    fields = [("queue", item.queue), ("state", str(item.state)), ("key", item.key), ("dedup key", item.dedup_key),
              ("priority", item.priority), ("attempts", attempts), ("created", short_time(item.created_at)),
              ("run at", short_time(item.run_at)), ("finished", item.finished_at and short_time(item.finished_at)),
              ("lease", item.lease_owner and f"{item.lease_owner} until {short_time(item.lease_expires_at)}")]
    click.echo(f"item {item.id}")
    for name, value in fields:
        if value is not None:
            click.echo(f"  {name + ':':<10} {value}")
    if why:
        click.echo(f"  {'waiting:':<10} {why}")
    click.echo("payload:")
    click.echo(textwrap.indent(json.dumps(item.payload, indent=2, ensure_ascii=False), "  "))
    if item.last_error:
        click.echo("last error:")
        click.echo(textwrap.indent(item.last_error, "  "))


@main.command()
@global_options
@click.pass_context
@friendly
def migrate(ctx: click.Context) -> None:
    """Apply the schema migrations (also done on first use)."""
    app = app_from(ctx)
    applied = app.migrate()
    click.echo(f"applied migration(s) {', '.join(map(str, applied))}" if applied else "schema is up to date")


@main.command()
@global_options
@click.option("--orders", default=None, type=click.IntRange(1, 10_000_000),
              help="Orders to place  [default: 2000; with --compare, 4800: 600 a second for 8 s]")
@click.option("--drivers", default=None, type=click.IntRange(1, 1_000_000),
              help="Drivers in the city  [default: 50; with --compare, 200]")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="Worker processes.")
@click.option("--compare", is_flag=True,
              help="Run the same order stream twice: one order at a time by one loop, then asynchronously "
                   "(--workers processes, batches), and print the two side by side.")
@click.pass_context
@friendly
def demo(ctx: click.Context, orders: int | None, drivers: int | None, workers: int, compare: bool) -> None:
    """The food-delivery showcase: orders pour into the application's own table, and workers match
    each batch of them to free drivers by least total pickup distance, each order to exactly one
    driver. Runs on a fresh SQLite file unless --db is given ($CONVEYOR_DATABASE_URL is not used)."""
    try:
        from .demo import run_compare, run_demo
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("scipy", "numpy"):
            raise
        raise UsageError("conveyor demo needs scipy, which is not installed: pip install 'conveyor[demo]'") from None

    if compare:
        ok = run_compare(ctx.obj["db"], orders=orders, drivers=drivers, workers=workers)
    else:
        ok = run_demo(ctx.obj["db"], orders=orders or 2000, drivers=drivers or 50, workers=workers)
    sys.exit(0 if ok else 1)
