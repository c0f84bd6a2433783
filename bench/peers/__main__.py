"""The peers next to conveyor, in one invocation: drain (and latency) of the minimal bare loop, the raw
loop, conveyor, PgQueuer, procrastinate, Celery and RQ, with every drain's ratio to the minimal loop;
then conveyor's held-snapshot run on each store.

    .venv/bin/python -m bench.peers [--n 20000] [--only minimal raw conveyor pgqueuer procrastinate celery rq]
                                    [--stores sqlite postgres] [--pgqueuer-batch 10 100 500]
                                    [--procrastinate-concurrency 10] [--latency-seconds 5 | --no-latency]
                                    [--horizon-seconds 300]

Runs with conveyor's venv (it imports conveyor for the conveyor, raw and minimal rows) and starts
each peer in the peers' own venv (`make bench-peers-venv` → bench/peers/.venv, pinned in
bench/peers/requirements.txt) as `python -m bench.peers.peer NAME drain|latency …`, one process per
peer run; see bench/peers/peer.py for what a peer run measures.

Rows:
  minimal / raw / conveyor  per store (SQLite, PostgreSQL): bench.minimal.run, bench.raw_*.run,
                            bench.throughput.run_conveyor (fresh databases, N items, 2 processes,
                            batch 100); drain = first fork → last exit
  each peer                 N items, 2 worker processes; drain = first handler call → the store
                            shows all done; "from fork" = the workers' fork → all done, the same
                            span as our rows' drain (PgQueuer: for each --pgqueuer-batch, the best
                            reported; procrastinate: for each --procrastinate-concurrency)
`× minimal` is drain/s over the same store's minimal loop (minimal/s, shown): for our rows the
minimal row; for each peer a PostgreSQL minimal run made right before its drain (the Redis peers
too: the durable ceiling; Redis here does not persist), so that the machine's drift over the
minutes of a run hits both. Latency (PostgreSQL
and the peers only): submit → handler start with idle workers, 1 item / 5 ms from another process.

Held snapshot (when conveyor is among --only; --horizon-seconds, default 300, 0 skips it): after the
table's runs, bench.horizon's run for conveyor on each of --stores: 2,000 items/s submitted by
another process for --horizon-seconds while 2 worker processes drain them and another connection
holds one read transaction open the whole time (PostgreSQL: REPEATABLE READ, vacuum cannot clean up
behind it; SQLite: the WAL cannot be checkpointed past it). A second table: throughput and claim
latency at the start and end of the run, claim p99 at the end, the table's (PostgreSQL) or the WAL's
(SQLite) size at start and end.

One JSON line per row, and one per held-snapshot run, is appended to bench/results/peers.jsonl (with
the load average); both tables are written to bench/results/peers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from .. import horizon, minimal, raw_postgres, raw_sqlite, throughput
from .. import latency as latency_bench
from ..common import PG_ADMIN_URL, RESULTS_DIR, base_line, fresh_url, pg_database, pg_problem, record, sqlite_database

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEERS_PYTHON = os.path.join(ROOT, "bench", "peers", ".venv", "bin", "python")
PEERS = ("pgqueuer", "procrastinate", "celery", "rq")
OURS = ("minimal", "raw", "conveyor")
console = Console(width=max(160, Console().width))


def run_peer(args: argparse.Namespace, name: str, workload: str, extra: list[str]) -> dict:
    """One peer run in the peers' venv; its RESULT line, or {"error": …}."""
    cmd = [args.peers_python, "-m", "bench.peers.peer", name, workload, "--n", str(args.n), "--pg", args.pg,
           "--redis", args.redis, "--seconds", str(args.latency_seconds), *extra]
    env = dict(os.environ, PYTHONPATH=ROOT)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["wall_seconds"] = round(time.monotonic() - t0, 1)
            return out
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
    return {"peer": name, "workload": workload, "error": f"exit {proc.returncode}: {tail}"}


def best_drain(args: argparse.Namespace, name: str, flag: str | None, values: list[int]) -> dict:
    runs = [run_peer(args, name, "drain", [flag, str(v)] if flag else []) for v in (values if flag else [None])]
    for v, r in zip(values if flag else [None], runs):
        label = f"{name} {flag} {v}" if flag else name
        console.print(f"  {label}: " + (f"[red]{r['error']}[/]" if "error" in r else
                                        f"submit {r['submit_per_s']:,.0f}/s, drain {r['drain_per_s']:,.0f}/s"))
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    best = max(ok, key=lambda r: r["drain_per_s"])
    if len(runs) > 1:
        best["tried"] = [{"config": r.get("config"), "drain_per_s": r.get("drain_per_s"), "error": r.get("error")}
                         for r in runs]
    return best


def our_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for store in args.stores:
        if "minimal" in args.only:
            console.print(f"[bold]minimal[/] {store} …")
            r = minimal.run(store, args.n, 2, 100, admin_url=args.pg)
            rows.append({"system": "minimal", "store": store, "submit_per_s": r["minimal_insert_per_s"],
                         "drain_per_s": r["minimal_per_s"], "cpu_us_per_item": r["minimal_cpu_us_per_item"],
                         "config": {"processes": 2, "batch_size": 100}})
        if "raw" in args.only:
            console.print(f"[bold]raw loop[/] {store} …")
            r = raw_sqlite.run(args.n, 2, 100) if store == "sqlite" else raw_postgres.run(args.n, 2, 100, args.pg)
            rows.append({"system": "raw", "store": store, "submit_per_s": r["raw_insert_per_s"],
                         "drain_per_s": r["raw_per_s"], "cpu_us_per_item": r["raw_cpu_us_per_item"],
                         "config": {"processes": 2, "batch_size": 100, "cycle": r.get("raw_cycle", "transaction")}})
        if "conveyor" in args.only:
            console.print(f"[bold]conveyor[/] {store} …")
            ctx = sqlite_database() if store == "sqlite" else pg_database(args.pg, suffix="peers")
            with ctx as where:
                url = f"sqlite:///{where}" if store == "sqlite" else where
                r = throughput.run_conveyor(url, args.n, 2, 100, 4)
            rows.append({"system": "conveyor", "store": store, "submit_per_s": r["submit_per_s"],
                         "drain_per_s": r["drain_per_s"], "cpu_us_per_item": r["drain_cpu_us_per_item"],
                         "config": {"processes": 2, "batch_size": 100, "concurrency": 4}})
    return rows


def our_latency(args: argparse.Namespace, rows: list[dict]) -> None:
    """Conveyor's and the minimal loop's latency on each store, attached to their rows."""
    interval = 0.005
    for row in rows:
        if row["system"] not in ("conveyor", "minimal"):
            continue
        console.print(f"[bold]latency[/] {row['system']} {row['store']}, {args.latency_seconds:g} s …")
        with fresh_url(row["store"], args.pg, suffix="peerslat") as url:
            if row["system"] == "conveyor":
                r = latency_bench.run_conveyor(url, args.latency_seconds, interval)
                prefix = ""
            else:
                r = latency_bench.run_minimal(row["store"], url, args.latency_seconds, interval)
                prefix = "minimal_"
        row.update({f"lat_{k}": r[f"{prefix}{k}"] for k in ("p50", "p95", "p99", "max")})
        row.update({k: r[f"{prefix}{k}"] for k in ("submit_call_p50", "after_submit_p50", "after_submit_p99")})


def peer_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in PEERS:
        if name not in args.only:
            continue
        console.print(f"[bold]{name}[/]: drain {args.n:,} …")
        flag, values = {"pgqueuer": ("--batch", args.pgqueuer_batch),
                        "procrastinate": ("--concurrency", args.procrastinate_concurrency)}.get(name, (None, []))
        if args.adjacent_minimal:
            # the ceiling measured right before this peer, so that drift in the machine's load over
            # the minutes of a run hits the peer and its reference alike
            adjacent = minimal.run("postgres", args.n, 2, 100, admin_url=args.pg)["minimal_per_s"]
        r = best_drain(args, name, flag, values)
        row = {"system": name, "store": r.get("store", "postgres" if name in ("pgqueuer", "procrastinate") else "redis"),
               "peer_result": r}
        if args.adjacent_minimal:
            row["adjacent_minimal_per_s"] = round(adjacent, 1)
        if "error" in r:
            row["error"] = r["error"]
        else:
            row.update({"submit_per_s": r["submit_per_s"], "drain_per_s": r["drain_per_s"],
                        "from_fork_per_s": r["from_fork_per_s"], "config": r["config"],
                        "version": r["version"], "drain_end": r["drain_end"]})
            if args.latency_seconds:
                console.print(f"  {name}: latency {args.latency_seconds:g} s …")
                extra = []
                if flag:
                    extra = [flag, str(r["config"]["batch_size" if name == "pgqueuer" else "concurrency"])]
                lat = run_peer(args, name, "latency", extra)
                if "error" in lat:
                    row["latency_error"] = lat["error"]
                    console.print(f"  [red]{lat['error']}[/]")
                else:
                    row.update({k: lat[k] for k in ("lat_p50", "lat_p95", "lat_p99", "lat_max", "submit_call_p50",
                                                    "after_submit_p50", "after_submit_p99", "submit_slip_max_ms")})
        rows.append(row)
    return rows


def horizon_rows(args: argparse.Namespace) -> list[dict]:
    """Conveyor's held-snapshot run (bench.horizon) on each store, as result lines (a failed run: its error)."""
    rows = []
    for store in args.stores:
        console.print(f"[bold]held snapshot[/] conveyor {store}: {horizon.RATE:,.0f} items/s for "
                      f"{args.horizon_seconds:g} s, with {horizon.HOLD[store]} …")
        try:
            line = horizon.bench_store(store, args.pg, seconds=args.horizon_seconds, workload="peers")
            line.pop("series")
        except Exception as exc:
            console.print(f"  [red]{type(exc).__name__}: {exc}[/]")
            line = base_line("peers", store, args.pg, seconds=args.horizon_seconds, error=f"{type(exc).__name__}: {exc}")
        line.update(system="conveyor", run="held snapshot")
        rows.append(line)
    return rows


def add_ratios(rows: list[dict]) -> None:
    for r in rows:
        if r["system"] in OURS:
            r["from_fork_per_s"] = r["drain_per_s"]  # their drains already count from the first fork
    ceiling = {r["store"]: r["drain_per_s"] for r in rows if r["system"] == "minimal"}
    lat_ceiling = {r["store"]: r.get("lat_p50") for r in rows if r["system"] == "minimal"}
    for r in rows:
        ref = "postgres" if r["store"] == "redis" else r["store"]
        r["minimal_reference"] = f"minimal {ref}"
        c = r.get("adjacent_minimal_per_s") or ceiling.get(ref)
        if r.get("drain_per_s") and c:
            r["minimal_per_s"] = round(c, 1)
            r["ratio_to_minimal"] = round(r["drain_per_s"] / c, 3)
            r["from_fork_ratio_to_minimal"] = round(r["from_fork_per_s"] / c, 3)
        if r.get("lat_p50") is not None and lat_ceiling.get(ref):
            r["lat_p50_ratio_to_minimal"] = round(r["lat_p50"] / lat_ceiling[ref], 2)


def table(rows: list[dict], n: int, load: tuple) -> Table:
    t = Table(title=f"{n:,} items, 2 worker processes, no-op handler; load average before "
                    f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    for col in ("system", "store", "config", "submit/s", "drain/s", "minimal/s", "× minimal", "from fork/s", "× minimal ",
                "lat p50 ms", "lat p99 ms", "after submit p50 ms"):
        t.add_column(col, justify="left" if col in ("system", "store", "config") else "right")
    num = lambda v: "—" if v is None else f"{v:,.0f}"  # noqa: E731
    ms = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        c = r.get("config") or {}
        names = {"batch_size": "batch", "concurrency": "conc", "pool": "pool", "worker": "", "cycle": ""}
        short = " ".join(f"{names[k]} {c[k]}".strip() for k in names if k in c)
        if "error" in r:
            t.add_row(r["system"], r["store"], "", f"[red]error: {r['error'][:60]}[/]", *[""] * 8)
            continue
        t.add_row(r["system"], r["store"], short, num(r.get("submit_per_s")), num(r.get("drain_per_s")),
                  num(r.get("minimal_per_s")),
                  "—" if r.get("ratio_to_minimal") is None else f"{r['ratio_to_minimal']:.3f}",
                  num(r.get("from_fork_per_s")),
                  "—" if r.get("from_fork_ratio_to_minimal") is None else f"{r['from_fork_ratio_to_minimal']:.3f}",
                  ms(r.get("lat_p50")), ms(r.get("lat_p99")), ms(r.get("after_submit_p50")))
    return t


HELD_TITLE = ("Held snapshot, conveyor: items submitted at a fixed rate while 2 worker processes drain them and "
              "another connection holds one read transaction open for the whole run (PostgreSQL: REPEATABLE READ, "
              "vacuum cannot clean up behind it; SQLite: the WAL cannot be checkpointed past it). resolved/s over "
              "the first and last fifth of the run; claim ms: the workers' claim statement timed before and after "
              "the run, p99 over the probes (every 5 s) of the last fifth")


def markdown(rows: list[dict], n: int, load: tuple, took: float, held: list[dict]) -> str:
    """The table as the README and bench/README.md show it: one run, every ratio to the same store's
    minimal loop (a peer's: to a PostgreSQL minimal run made right before its drain); then, if
    they ran, conveyor's held-snapshot runs."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = [f"One run of `make bench-peers` ({when}, {took / 60:.0f} min, load average {load[0]:.2f} at start): "
           f"{n:,} items, 2 worker processes, no-op handler.", "",
           "| system | store | config | submit/s | drain/s | × minimal | latency p50 / p99 ms | p50 × minimal |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r.get("config") or {}
        names = {"batch_size": "batch", "concurrency": "conc", "pool": "pool"}
        short = " ".join(f"{names[k]} {c[k]}" for k in names if k in c)
        if "error" in r:
            out.append(f"| {r['system']} | {r['store']} | {short} | error: {r['error'][:60]} | | | | |")
            continue
        lat = "—" if r.get("lat_p50") is None else f"{r['lat_p50']:.2f} / {r['lat_p99']:.2f}"
        times = lambda v: "—" if v is None else f"{v:.2f}×"  # noqa: E731
        out.append(f"| {r['system']} | {r['store']} | {short} | {r.get('submit_per_s') or 0:,.0f} | "
                   f"{r.get('drain_per_s') or 0:,.0f} | {times(r.get('ratio_to_minimal'))} | "
                   f"{lat} | {times(r.get('lat_p50_ratio_to_minimal'))} |")
    if held:
        out += ["", HELD_TITLE + ".", "", horizon.summary_markdown(held).rstrip("\n")]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="items per drain (default %(default)s)")
    ap.add_argument("--only", nargs="+", choices=OURS + PEERS, default=list(OURS + PEERS))
    ap.add_argument("--stores", nargs="+", choices=("sqlite", "postgres"), default=["sqlite", "postgres"],
                    help="stores for the minimal, raw and conveyor rows and the held-snapshot runs")
    ap.add_argument("--pgqueuer-batch", type=int, nargs="+", default=[10, 100, 500])
    ap.add_argument("--procrastinate-concurrency", type=int, nargs="+", default=[10])
    ap.add_argument("--no-adjacent-minimal", dest="adjacent_minimal", action="store_false",
                    help="set each peer against the one PostgreSQL minimal run of the minimal row, rather than "
                         "against a minimal run made right before that peer's drain (the default)")
    ap.add_argument("--latency-seconds", type=float, default=5.0, help="0 for no latency runs")
    ap.add_argument("--no-latency", dest="latency_seconds", action="store_const", const=0.0)
    ap.add_argument("--horizon-seconds", type=float, default=300.0,
                    help="seconds of conveyor's held-snapshot run on each of --stores, when conveyor is among "
                         "--only (bench.horizon; default %(default)g, 0 to skip it)")
    ap.add_argument("--peers-python", default=PEERS_PYTHON, help="the peers' venv python (default %(default)s)")
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    ap.add_argument("--redis", default=os.environ.get("CONVEYOR_BENCH_REDIS", "redis://127.0.0.1:6379/5"),
                    help="a Redis URL with a non-zero db number: it is FLUSHDB'd (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one peer run may take")
    ap.add_argument("--json-out", default=os.path.join(RESULTS_DIR, "peers.jsonl"), help="'' for none")
    ap.add_argument("--markdown-out", default=os.path.join(RESULTS_DIR, "peers.md"),
                    help="the tables as markdown, for the README ('' for none)")
    args = ap.parse_args(argv)

    problem = pg_problem(args.pg)
    if problem:
        console.print(f"[red]{problem}[/]")
        return 2
    if any(p in args.only for p in PEERS) and not os.path.exists(args.peers_python):
        console.print(f"[red]{args.peers_python} not found: create the peers' venv with `make bench-peers-venv`[/]")
        return 2
    load = os.getloadavg()
    started = time.monotonic()
    rows = our_rows(args)
    if args.latency_seconds:
        our_latency(args, rows)
    rows += peer_rows(args)
    add_ratios(rows)
    held = horizon_rows(args) if args.horizon_seconds and "conveyor" in args.only else []
    for r in rows:
        line = base_line("peers", r["store"], args.pg, system=r["system"], items=args.n, processes=2)
        if r["store"] == "redis":
            line.pop("sqlite_version", None)
        line["loadavg_1m_before"] = round(load[0], 2)
        line["loadavg_5m_before"] = round(load[1], 2)
        line.update({k: v for k, v in r.items() if k not in ("system", "store")})
        record("peers", line, args.json_out)
    for line in held:
        record("peers", line, args.json_out)
    console.print(table(rows, args.n, load))
    if held:
        console.print(horizon.table(held, HELD_TITLE, detail=False))
    end = os.getloadavg()
    took = time.monotonic() - started
    console.print(f"took {took:.0f} s; load average after {end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f}")
    if args.markdown_out:
        with open(args.markdown_out, "w") as f:
            f.write(markdown(rows, args.n, load, took, held))
        console.print(f"markdown table: {args.markdown_out}")
    return 1 if any("error" in r for r in rows + held) else 0


if __name__ == "__main__":
    sys.exit(main())
