"""The whole benchmark suite in one command, both stores:

    python -m bench            # full: throughput (20k ×3, 200k), latency 10 s, steady 60 s, big table 1M,
                               #       held snapshot 300 s, scaling 20k/cell, memory 1M items  (~20-25 min, estimated)
    python -m bench --quick    # quick: throughput 20k ×1, latency 10 s, steady 15 s, big table 1M,
                               #       held snapshot 60 s, scaling 10k/cell, memory 300k       (~5-6 min)
    python -m bench --only latency steady    # a subset

Every workload appends its JSON lines to bench/results/<workload>.jsonl and prints its own table;
at the end this prints a summary (every figure with its ratio to the raw-SQL loop where there is
one, and the issue-5 targets), also written to bench/results/summary.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
import traceback
from types import SimpleNamespace

from rich.console import Console

from . import bigtable, horizon, latency, memory, scaling, steady, throughput
from .common import PG_ADMIN_URL, RESULTS_DIR, pg_problem, pg_version, record

console = Console(width=max(120, Console().width))
WORKLOADS = ("throughput", "latency", "steady", "bigtable", "horizon", "scaling", "memory")


def run_throughput(quick: bool, stores: list[str], pg: str) -> list[dict]:
    lines = []
    sizes = [(20_000, 1)] if quick else [(20_000, 3), (200_000, 1)]
    for items, repeat in sizes:
        for store in stores:
            args = SimpleNamespace(store=store, items=items, processes=2, batch_size=100, concurrency=4,
                                   repeat=repeat, pg=pg, tmpdir=None)
            console.print(f"[bold]throughput[/] {store}: {items:,} items, 2 processes, batch 100, {repeat} round(s) …")
            line = throughput.bench_store(store, args)
            record("throughput", line)
            lines.append(line)
    console.print(throughput.table(lines))
    return lines


def _f(v, fmt="{:,.0f}") -> str:
    return "—" if v is None else fmt.format(v)


def _x(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def summary(results: dict[str, list[dict]], quick: bool, started: float, load: tuple, pg: str) -> str:
    """A markdown summary: one row per figure, one column per store, with ratios and targets."""
    by = {w: {} for w in WORKLOADS}
    for w, lines in results.items():
        for line in lines:
            if w == "throughput":
                by[w].setdefault(line["store"], {})[line["items"]] = line
            elif w == "horizon":
                if line.get("held"):
                    by[w][line["store"]] = line
            else:
                by[w][line["store"]] = line
    rows: list[tuple[str, str, str, str]] = []  # figure, sqlite, postgres, target

    def add(figure: str, cell, target: str = "") -> None:
        rows.append((figure, cell("sqlite"), cell("postgres"), target))

    def get(w: str, store: str, key=None):
        v = by[w].get(store)
        if v is not None and key is not None:
            v = v.get(key)
        return v

    tp = lambda s: (by["throughput"].get(s) or {}).get(20_000)  # noqa: E731
    add("throughput: bulk submit_many 20k, items/s",
        lambda s: f"{_f(tp(s)['submit_per_s'])} (raw insert {_f(tp(s).get('raw_insert_per_s'))})" if tp(s) else "—",
        "≥ 100,000 both")
    add("throughput: drain 20k, 2 proc, batch 100, items/s (× raw loop)",
        lambda s: f"{_f(tp(s)['drain_per_s'])} ({_x(tp(s)['ratio_to_raw'])} raw {_f(tp(s)['raw_per_s'])})" if tp(s) else "—",
        "PG ≥ 25,000 & ≥ 0.80× raw; SQLite ≥ 50,000 & ≥ 0.75× raw")
    add("throughput: CPU µs/item, conveyor vs raw",
        lambda s: f"{tp(s)['drain_cpu_us_per_item']} vs {tp(s)['raw_cpu_us_per_item']} ({_x(tp(s).get('cpu_ratio_to_raw'))})" if tp(s) else "—")
    add("throughput: minimal bare loop drain/s; conveyor × minimal (raw × minimal)",
        lambda s: (f"{_f(tp(s)['minimal_per_s'])}; {_x(tp(s)['ratio_to_minimal'])} ({_x(tp(s)['raw_ratio_to_minimal'])})"
                   if tp(s) and tp(s).get("minimal_per_s") else "—"))
    for s_items in ((200_000,) if not quick else ()):
        big = lambda s: (by["throughput"].get(s) or {}).get(s_items)  # noqa: E731
        add(f"throughput {s_items:,}: submit/s; drain/s (× raw)",
            lambda s: f"{_f(big(s)['submit_per_s'])}; {_f(big(s)['drain_per_s'])} ({_x(big(s)['ratio_to_raw'])})" if big(s) else "—")
    lat = lambda s: get("latency", s)  # noqa: E731
    add("latency submit→handler start, p50 ms (× raw)",
        lambda s: f"{lat(s)['p50']:.2f} ({_x(lat(s)['p50_ratio_to_raw'])} raw {lat(s)['raw_p50']:.2f})" if lat(s) else "—",
        "PG ≤ 3; SQLite ≤ 2")
    add("latency p50 / p99 ms, minimal bare loop (conveyor × minimal)",
        lambda s: (f"{lat(s)['minimal_p50']:.2f} / {lat(s)['minimal_p99']:.2f} "
                   f"({_x(lat(s)['p50_ratio_to_minimal'])} / {_x(lat(s)['p99_ratio_to_minimal'])})"
                   if lat(s) and lat(s).get("minimal_p50") is not None else "—"))
    add("latency p95 ms (× raw)",
        lambda s: f"{lat(s)['p95']:.2f} ({_x(lat(s)['p95_ratio_to_raw'])} raw {lat(s)['raw_p95']:.2f})" if lat(s) else "—")
    add("latency p99 ms (× raw)",
        lambda s: f"{lat(s)['p99']:.2f} ({_x(lat(s)['p99_ratio_to_raw'])} raw {lat(s)['raw_p99']:.2f})" if lat(s) else "—",
        "≤ 10 both")
    add("latency, of which the submit call itself (its commit), p50 ms (raw run)",
        lambda s: f"{lat(s)['submit_call_p50']:.2f} (raw run {lat(s)['raw_submit_call_p50']:.2f})" if lat(s) and lat(s).get("submit_call_p50") is not None else "—")
    add("latency after the submit returned → handler start, p50 / p99 ms (× raw)",
        lambda s: (f"{lat(s)['after_submit_p50']:.2f} / {lat(s)['after_submit_p99']:.2f} "
                   f"({_x(lat(s)['after_submit_p50_ratio_to_raw'])} / {_x(lat(s)['after_submit_p99_ratio_to_raw'])} raw "
                   f"{lat(s)['raw_after_submit_p50']:.2f} / {lat(s)['raw_after_submit_p99']:.2f})")
        if lat(s) and lat(s).get("after_submit_p50") is not None else "—")
    add("latency max ms (× raw)",
        lambda s: f"{lat(s)['max']:.2f} ({_x(lat(s)['max_ratio_to_raw'])} raw {lat(s)['raw_max']:.2f})" if lat(s) else "—")
    st = lambda s: get("steady", s)  # noqa: E731
    add("steady: offered rate → resolved/s (× raw)",
        lambda s: f"{_f(st(s)['rate'])} → {_f(st(s)['throughput_per_s'])} ({_x(st(s)['throughput_ratio_to_raw'])})" if st(s) else "—")
    add("steady: lag p50 / p99 / max ms (raw)",
        lambda s: (f"{_f(st(s)['lag_p50_ms'])} / {_f(st(s)['lag_p99_ms'])} / {_f(st(s)['lag_max_ms'])} "
                   f"(raw {_f(st(s)['raw_lag_p50_ms'])} / {_f(st(s)['raw_lag_p99_ms'])} / {_f(st(s)['raw_lag_max_ms'])})") if st(s) else "—")
    add("steady: max backlog (raw)",
        lambda s: f"{_f(st(s)['max_backlog'])} (raw {_f(st(s)['raw_max_backlog'])})" if st(s) else "—")
    bt = lambda s: get("bigtable", s)  # noqa: E731
    add("big table (1M resolved): drain/s empty → big (big/empty)",
        lambda s: f"{_f(bt(s)['empty_drain_per_s'])} → {_f(bt(s)['big_drain_per_s'])} ({_x(bt(s)['big_ratio_drain'])})" if bt(s) else "—",
        "big/empty ≥ 0.90")
    add("big table: raw loop empty → big (big/empty)",
        lambda s: f"{_f(bt(s)['empty_raw_per_s'])} → {_f(bt(s)['big_raw_per_s'])} ({_x(bt(s)['big_ratio_raw'])})" if bt(s) else "—")
    add("big table: drain × raw, empty / big",
        lambda s: f"{_x(bt(s)['empty_ratio_to_raw'])} / {_x(bt(s)['big_ratio_to_raw'])}" if bt(s) else "—")
    add("big table: submit/s empty → big (big/empty)",
        lambda s: f"{_f(bt(s)['empty_submit_per_s'])} → {_f(bt(s)['big_submit_per_s'])} ({_x(bt(s)['big_ratio_submit'])})" if bt(s) else "—")
    hz = lambda s: get("horizon", s)  # noqa: E731
    add("held snapshot: resolved/s start → end (end/start)",
        lambda s: f"{_f(hz(s)['throughput_start_per_s'])} → {_f(hz(s)['throughput_end_per_s'])} ({_x(hz(s)['throughput_end_over_start'])})" if hz(s) else "—")
    add("held snapshot: claim ms start → end (end/start; p99 at the end; max)",
        lambda s: f"{hz(s)['claim_ms_start']:.2f} → {hz(s)['claim_ms_end']:.2f} ({_x(hz(s)['claim_end_over_start'])}; p99 {_f(hz(s).get('claim_ms_p99_end'), '{:.2f}')}; max {hz(s)['claim_ms_max']:.2f})" if hz(s) else "—")
    add("held snapshot: buffers per claim start → end (PG)",
        lambda s: f"{hz(s)['buffers_start']:,} → {hz(s)['buffers_end']:,}" if hz(s) and "buffers_start" in hz(s) else "n/a")
    add("held snapshot: table MB start → end; dead tuples (PG)",
        lambda s: f"{hz(s)['table_mb_start']:.1f} → {hz(s)['table_mb_end']:.1f}; {hz(s)['dead_tuples_end']:,}" if hz(s) and "table_mb_start" in hz(s) else "n/a")
    add("held snapshot: WAL MB start → end; database file MB at the end (SQLite)",
        lambda s: f"{hz(s)['wal_mb_start']:.1f} → {hz(s)['wal_mb_end']:.1f}; {hz(s)['db_mb_end']:.1f}" if hz(s) and "wal_mb_start" in hz(s) else "n/a")
    add("held snapshot: lag p50 / p99 ms", lambda s: f"{_f(hz(s)['lag_p50_ms'])} / {_f(hz(s)['lag_p99_ms'])}" if hz(s) else "—")
    sc = lambda s: get("scaling", s)  # noqa: E731

    def sc_cell(s: str, p: int, b: int) -> str:
        line = sc(s)
        c = next((c for c in (line or {}).get("cells", []) if c["processes"] == p and c["batch_size"] == b), None)
        return "—" if c is None else f"{_f(c['drain_per_s'])} ({_x(c['ratio_to_raw'])})"

    for p, b in ((1, 1), (2, 1), (2, 10), (2, 100), (2, 500), (4, 100), (4, 500)):
        add(f"scaling: P={p}, batch {b}, items/s (× raw)", lambda s, p=p, b=b: sc_cell(s, p, b))

    def best(s: str) -> str:
        line = sc(s)
        if not line:
            return "—"
        c = max(line["cells"], key=lambda c: c["drain_per_s"])
        return f"{_f(c['drain_per_s'])} at P={c['processes']}, batch {c['batch_size']} ({_x(c['ratio_to_raw'])})"

    add("scaling: best cell", best)
    me = lambda s: get("memory", s)  # noqa: E731
    add("memory: worker RSS MB start / after 1st chunk / end (items)",
        lambda s: f"{me(s)['rss_start_mb']} / {me(s)['rss_after_first_chunk_mb']} / {me(s)['rss_end_mb']} ({me(s)['items']:,})" if me(s) else "—",
        "flat")
    add("memory: growth after the 1st chunk",
        lambda s: f"{me(s)['growth_mb']:+.1f} MB ({me(s)['growth_pct']:+.1f}%) {'flat' if me(s)['flat'] else 'GROWS'}" if me(s) else "—")

    when = dt.datetime.fromtimestamp(started, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    minutes = (time.time() - started) / 60
    head = (f"`python -m bench{' --quick' if quick else ''}`, {when}, {minutes:.1f} min; "
            f"load average (1/5/15 min) at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, "
            f"at end {os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f} / {os.getloadavg()[2]:.2f}; "
            f"{os.cpu_count()} cores")
    with_pg = ""
    try:
        with_pg = f", PostgreSQL {pg_version(pg).split()[0]}"
    except Exception:  # noqa: BLE001
        pass
    import sqlite3

    head += f", SQLite {sqlite3.sqlite_version}{with_pg}."
    out = [head, "", "| figure | SQLite | PostgreSQL | target (issue 5) |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out) + "\n"


def latest_lines() -> dict[str, list[dict]]:
    """The last result line per workload, store (and size / held) from bench/results/*.jsonl."""
    import json

    out: dict[str, list[dict]] = {}
    for w in WORKLOADS:
        path = os.path.join(RESULTS_DIR, f"{w}.jsonl")
        if not os.path.exists(path):
            continue
        last: dict = {}
        with open(path, encoding="utf-8") as f:
            for text in f:
                try:
                    line = json.loads(text)
                except ValueError:
                    continue
                last[(line.get("store"), line.get("items") if w == "throughput" else None, line.get("held"))] = line
        out[w] = list(last.values())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the ~5-minute version")
    ap.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--store", choices=("sqlite", "postgres", "all"), default="all")
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    ap.add_argument("--summarize", action="store_true",
                    help="run nothing: rebuild the summary from the last lines in bench/results/*.jsonl")
    args = ap.parse_args(argv)
    started, load = time.time(), os.getloadavg()
    if args.summarize:
        text = summary(latest_lines(), args.quick, started, load, args.pg)
        print(text)
        return 0
    stores = ["sqlite", "postgres"] if args.store == "all" else [args.store]
    if "postgres" in stores and (problem := pg_problem(args.pg)):
        console.print(f"[yellow]skipping postgres: {problem}[/]")
        stores.remove("postgres")
    q = ["--quick"] if args.quick else []
    common = ["--pg", args.pg]
    store_arg = ["--store", stores[0] if len(stores) == 1 else "all"]
    runners = {
        "throughput": lambda: run_throughput(args.quick, stores, args.pg),
        "latency": lambda: latency.main(store_arg + common),
        "steady": lambda: steady.main(store_arg + common + q),
        "bigtable": lambda: bigtable.main(store_arg + common + q),
        "horizon": lambda: horizon.main(store_arg + common + q),
        "scaling": lambda: scaling.main(store_arg + common + q),
        "memory": lambda: memory.main(store_arg + common + q),
    }
    results: dict[str, list[dict]] = {}
    failed: list[str] = []
    for name in WORKLOADS:
        if name not in args.only:
            continue
        console.rule(f"[bold]{name}[/]")
        t0 = time.perf_counter()
        try:
            results[name] = runners[name]()
        except Exception:  # noqa: BLE001 - one broken workload must not hide the others' results
            failed.append(name)
            console.print(f"[red]{name} failed:[/]\n{traceback.format_exc()}")
        console.print(f"[dim]{name}: {time.perf_counter() - t0:.0f} s[/]")
    try:
        text = summary(results, args.quick, started, load, args.pg)
    except Exception:  # noqa: BLE001 - the results are in the .jsonl files; --summarize rebuilds it
        text = f"summary failed:\n{traceback.format_exc()}\n"
    if failed:
        text += f"\nFailed workloads: {', '.join(failed)} (see the log above).\n"
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    console.rule("[bold]summary[/]")
    console.print(text, markup=False, highlight=False)
    console.print(f"written: {os.path.join(RESULTS_DIR, 'summary.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
