"""Scaling: drain items/s over worker processes 1/2/4 × batch sizes 1/10/100/500, both stores, each
cell next to the raw loop at the same processes and batch size; and a chart of the grid.

Per store and cell, in one invocation:
  conveyor  bench.throughput.run_conveyor: fresh database, `submit_many` N items, drain with
            `app.run_worker(processes=P, stop_when_empty=True)` (no-op handler, batch_size=B,
            concurrency 4), checked from app.stats()
  raw       bench.raw_sqlite.run / bench.raw_postgres.run: the store's claim + batched resolve in a
            bare loop, P processes, batch B, on its own fresh database
N = 5,000 for batch 1 and 20,000 otherwise (--quick: 2,000 and 10,000).
Writes bench/results/scaling.png: one panel per store, x = batch size (log), y = items/s, one solid
line per process count (conveyor) and a dashed one of the same colour (raw loop).

    python -m bench.scaling [--store sqlite|postgres|all] [--processes 1 2 4] [--batch-sizes 1 10 100 500] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console
from rich.table import Table

from . import raw_postgres, raw_sqlite, throughput
from .common import PG_ADMIN_URL, RESULTS_DIR, base_line, fresh_url, ratio, record, stores_from

console = Console(width=max(110, Console().width))


def cell(store: str, p: int, b: int, n: int, args: argparse.Namespace) -> dict:
    with fresh_url(store, args.pg, args.tmpdir) as url:
        conv = throughput.run_conveyor(url, n, p, b, args.concurrency)
    raw = raw_sqlite.run(n, p, b, args.tmpdir) if store == "sqlite" else raw_postgres.run(n, p, b, args.pg)
    return {"processes": p, "batch_size": b, "items": n, "drain_per_s": round(conv["drain_per_s"], 1),
            "raw_per_s": round(raw["raw_per_s"], 1), "ratio_to_raw": ratio(conv["drain_per_s"], raw["raw_per_s"]),
            "drain_cpu_us_per_item": round(conv["drain_cpu_us_per_item"], 1),
            "raw_cpu_us_per_item": round(raw["raw_cpu_us_per_item"], 1)}


def chart(lines: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lines), figsize=(6.2 * len(lines), 4.6), squeeze=False)
    colors = {1: "tab:blue", 2: "tab:orange", 4: "tab:green"}
    for ax, line in zip(axes[0], lines):
        grid = line["cells"]
        for p in sorted({c["processes"] for c in grid}):
            cs = sorted((c for c in grid if c["processes"] == p), key=lambda c: c["batch_size"])
            xs = [c["batch_size"] for c in cs]
            color = colors.get(p)
            ax.plot(xs, [c["drain_per_s"] for c in cs], "o-", color=color, label=f"conveyor, {p} proc")
            ax.plot(xs, [c["raw_per_s"] for c in cs], "s--", color=color, alpha=0.55, label=f"raw loop, {p} proc")
        ax.set_xscale("log")
        ax.set_xticks(sorted({c["batch_size"] for c in grid}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlabel("batch size (log scale)")
        ax.set_ylabel("drain, items/s")
        version = line.get("sqlite_version") or line.get("pg_version") or ""
        ax.set_title(f"{line['store']} {version}: no-op drain (load {line['loadavg_1m_before']:.1f})")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"conveyor scaling, {os.cpu_count()} cores — solid: conveyor, dashed: raw SQL loop", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(lines: list[dict]) -> Table:
    t = Table(title="scaling: drain items/s (conveyor / raw loop = ratio)")
    t.add_column("store")
    t.add_column("P", justify="right")
    bs = sorted({c["batch_size"] for line in lines for c in line["cells"]})
    for b in bs:
        t.add_column(f"batch {b}", justify="right")
    for line in lines:
        for p in sorted({c["processes"] for c in line["cells"]}):
            row = []
            for b in bs:
                c = next((c for c in line["cells"] if c["processes"] == p and c["batch_size"] == b), None)
                row.append("—" if c is None else f"{c['drain_per_s']:,.0f} / {c['raw_per_s']:,.0f} = {c['ratio_to_raw']}")
            t.add_row(line["store"], str(p), *row)
    return t


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "postgres", "all"), default="all")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10, 100, 500])
    ap.add_argument("--items", type=int, default=None, help="items per cell (default 20000; 5000 for batch 1)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="10,000 items per cell (2,000 for batch 1)")
    ap.add_argument("--chart", default=os.path.join(RESULTS_DIR, "scaling.png"))
    ap.add_argument("--pg", default=PG_ADMIN_URL)
    ap.add_argument("--tmpdir", default=None)
    args = ap.parse_args(argv)
    big = args.items or (10_000 if args.quick else 20_000)
    small = args.items or (2_000 if args.quick else 5_000)
    lines = []
    for store in stores_from(args.store, args.pg, console):
        line = base_line("scaling", store, args.pg, concurrency=args.concurrency, items=big, items_batch_1=small)
        line["cells"] = []
        for p in args.processes:
            for b in args.batch_sizes:
                n = small if b == 1 else big
                console.print(f"[bold]scaling[/] {store}: {p} process(es), batch {b}, {n:,} items …")
                c = cell(store, p, b, n, args)
                console.print(f"    conveyor {c['drain_per_s']:,.0f}/s, raw {c['raw_per_s']:,.0f}/s, ratio {c['ratio_to_raw']}")
                line["cells"].append(c)
        record("scaling", line)
        lines.append(line)
    if lines:
        chart(lines, args.chart)
        console.print(f"chart: {args.chart}")
    console.print(table(lines))
    return lines


if __name__ == "__main__":
    main()
    sys.exit(0)
