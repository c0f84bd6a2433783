"""The SQL pieces both dialects' rows statements share (sqlite_rows, postgres_rows): quoting, the
columns adopt adds, index names, and the settles, which differ only in how a dialect spells a
parameter, the clock, the larger of two values and a boolean."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..model import RowsTable

CONVEYOR_COLUMNS = ("conveyor_token", "conveyor_owner", "conveyor_lease_until", "conveyor_attempts",
                    "conveyor_run_at", "conveyor_error", "conveyor_rescued")


@dataclass
class TableInfo:
    """What the database says of an application table."""

    pk: str
    pk_type: str
    columns: list[str]
    indexes: set[str] = field(default_factory=set)
    triggers: set[str] = field(default_factory=set)
    types: dict[str, str] = field(default_factory=dict)


def quote(name: str) -> str:
    """An identifier, quoted; a dotted name (schema.table) part by part."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def literal(value: str | int) -> str:
    """A status value (or any text) as an SQL literal."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def status_literals(rows: RowsTable, cast: str = "") -> dict[str, str]:
    """The status values as SQL literals, by the state each stands for; `cast` (PostgreSQL: the
    column's type) makes a CASE over them, and a comparison, of the column's own type (an enum)."""
    return {state: literal(v) + cast for state, v in rows.values.items()}


def index_name(rows: RowsTable, kind: str) -> str:
    """The name of an index (or trigger) adopt creates for the table: <table>_conveyor_<kind>,
    cut to PostgreSQL's 63 bytes."""
    base = rows.table.rpartition(".")[2]
    suffix = f"_conveyor_{kind}"
    return base.encode()[: 63 - len(suffix)].decode(errors="ignore") + suffix


@dataclass(frozen=True)
class Spelling:
    """How a dialect spells what the rows statements need."""

    arg: Callable[[str], str]  # a named parameter
    later: Callable[[str], str]  # the database's clock plus a parameter's seconds
    now: str
    greatest: str  # the larger of two values
    true: str
    false: str


def settle_statements(st: Any, rows: RowsTable, pk: str, fence: str, expired: str, sp: Spelling,
                      values: dict[str, str]) -> None:
    """The settles, alike on both dialects: each fenced (`fence`: the ids, the claim's token and
    the working value), each returning the keys it accepted. `expired` selects the rows rescue
    takes back; `values`: the status values as the dialect writes them (status_literals)."""
    t, s, p = quote(rows.table), quote(rows.status), quote(pk)
    pend, done, dead = values["pending"], values["resolved"], values["dead"]
    clear = "conveyor_owner = NULL, conveyor_lease_until = NULL"
    spent = f"CASE WHEN conveyor_attempts >= {sp.arg('max_attempts')} THEN {dead} ELSE {pend} END"
    st.resolve = f"UPDATE {t} SET {s} = {done}, {clear} WHERE {fence} RETURNING {p}"
    st.extend = f"UPDATE {t} SET conveyor_lease_until = {sp.later('lease')} WHERE {fence} RETURNING {p}"
    st.release = (f"UPDATE {t} SET {s} = {pend}, conveyor_attempts = {sp.greatest}(conveyor_attempts - 1, 0), {clear} "
                  f"WHERE {fence} RETURNING {p}")
    st.retry = (f"UPDATE {t} SET {s} = {spent}, conveyor_run_at = {sp.later('delay')}, conveyor_error = {sp.arg('error')}, "
                f"conveyor_rescued = {sp.false}, {clear} WHERE {fence} RETURNING {p}")
    st.backoff = (f"UPDATE {t} SET {s} = {pend}, conveyor_attempts = {sp.greatest}(conveyor_attempts - 1, 0), "
                  f"conveyor_run_at = {sp.later('delay')}, {clear} WHERE {fence} RETURNING {p}")
    st.fail = (f"UPDATE {t} SET {s} = {dead}, conveyor_error = {sp.arg('error')}, conveyor_rescued = {sp.false}, {clear} "
               f"WHERE {fence} RETURNING {p}")
    st.rescue = (
        f"UPDATE {t} SET {s} = {spent}, "
        "conveyor_error = 'lease expired: worker ' || coalesce(conveyor_owner, '?') || "
        "' stopped heartbeating during attempt ' || conveyor_attempts || "
        "' (it crashed, was killed, or lost the database)', "
        f"conveyor_rescued = {sp.true}, conveyor_run_at = {sp.now}, conveyor_token = NULL, {clear} "
        f"WHERE {p} IN ({expired}) RETURNING {p}, {s} = {dead}")


def controls_filter(rows: RowsTable, alias: str, now_epoch: str, true: str, as_text: Callable[[str], str]) -> str:
    """A rows claim's filter: the table (its queue) neither paused nor held, nor (with a key column)
    the row's key, as conveyor_controls says (what app.pause and a handler's Backoff write there).
    The probes are uncorrelated but for the last, which runs only while some key is paused or held,
    as for items. `as_text` spells a column as text (a key is named by its text)."""
    q = literal(rows.table)
    stopped = f"(paused = {true} OR held_until > {now_epoch})"
    out = f" AND NOT {_table_stopped(rows, now_epoch, true)}"
    if rows.key:
        k = f"{alias}.{quote(rows.key)}"
        out += (f" AND ({k} IS NULL OR NOT EXISTS (SELECT 1 FROM conveyor_controls WHERE queue = {q} AND scope = 'key' "
                f"AND {stopped}) OR NOT EXISTS (SELECT 1 FROM conveyor_controls AS ck WHERE ck.queue = {q} "
                f"AND ck.scope = 'key' AND ck.key = {as_text(k)} AND (ck.paused = {true} OR ck.held_until > {now_epoch})))")
    return out


def limit_state(rows: RowsTable, running: str, now_epoch: str, true: str) -> dict[bool, str]:
    """A limited rows claim's first read under its lock, as LIMIT_STATE for items: the clock, whether
    the table is paused or held, and (True: with max_in_progress) its `running` rows counted."""
    stopped = _table_stopped(rows, now_epoch, true)
    return {counted: f"SELECT {now_epoch}, {stopped}, {f'({running})' if counted else '0'}" for counted in (False, True)}


def _table_stopped(rows: RowsTable, now_epoch: str, true: str) -> str:
    """Whether the table (its queue) is paused or held now."""
    return (f"EXISTS (SELECT 1 FROM conveyor_controls WHERE queue = {literal(rows.table)} AND scope = 'queue' "
            f"AND key = '' AND (paused = {true} OR held_until > {now_epoch}))")
