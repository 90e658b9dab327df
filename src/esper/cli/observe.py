"""The observing commands of `esper`: run history (`runs`, `sql`, `compare`), the live terminal view
(`watch`), the web dashboard (`dashboard`) and TensorBoard exports (`tensorboard`).

They only read run directories (through Nissa); `register(app)` adds them to the `esper` command line.
Exit codes follow the command line's convention: 0 done, 1 failed, 2 bad input (a path that is not a run,
a query DuckDB refuses).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from esper.leyline import EsperError, EsperSettings, load_settings

console = Console()
err_console = Console(stderr=True)

RunsDirOption = Annotated[
    Path | None,
    typer.Option("--runs-dir", help="Folder of run directories [<ESPER_DATA_DIR>/runs].", show_default=False),
]


def _fail(what: str, why: str, code: int = 1) -> typer.Exit:
    """Print the command line's one error style, "<what failed>: <why>" in red on stderr, and return the
    exit to raise (1 failed, 2 bad input)."""
    err_console.print(f"[bold red]{escape(what)}[/]: {escape(why)}")
    return typer.Exit(code)


def runs_root(runs_dir: Path | None) -> Path:
    """The folder of run directories: the one given, or ESPER_DATA_DIR's `runs`."""
    if runs_dir is not None:
        return runs_dir
    return load_settings(EsperSettings).data_dir / "runs"


def print_rows(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    *,
    title: str | None = None,
    out: Console | None = None,
    vertical: bool = False,
) -> None:
    """A table when it fits the terminal (and `vertical` is not asked for); otherwise one block of
    `column: value` items per row, so nothing is cut at 80 columns."""
    out = out or console
    cells = [[("-" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    needed = sum(widths) + 3 * len(columns) + 1
    if needed <= out.width and not vertical:
        table = Table(title=title)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row_cells in cells:
            table.add_row(*row_cells)
        out.print(table)
        return
    if title:
        out.print(f"[bold]{title}[/]")
    for index, row_cells in enumerate(cells):
        if index:
            out.print()
        _print_block(out, list(zip(columns, row_cells, strict=True)))


def _print_block(out: Console, items: list[tuple[str, str]]) -> None:
    """One row as `column: value` items, short ones packed side by side up to the terminal's width, long
    ones on lines of their own (folded, never cut)."""
    line = Text()
    for column, value in items:
        item = Text.assemble((column, "bold"), ": ", value)
        if len(item) > out.width // 2 or "\n" in value:
            if line:
                out.print(line, overflow="fold")
                line = Text()
            out.print(item, overflow="fold")
        elif line and len(line) + 3 + len(item) > out.width:
            out.print(line, overflow="fold")
            line = item
        else:
            line = Text.assemble(line, "   ", item) if line else item
    if line:
        out.print(line, overflow="fold")


def _plain(cell: object) -> str:
    if isinstance(cell, Text):
        return cell.plain
    if isinstance(cell, str):
        return Text.from_markup(cell).plain
    return str(cell)


def print_table(table: Table, out: Console | None = None) -> None:
    """A rich table, readable at the terminal's width with nothing cut: as it is when it fits unwrapped,
    otherwise one block of `column: value` items per row (short items side by side), rather than a
    table whose narrowed columns shred every long word."""
    out = out or console
    natural = Measurement.get(out, out.options.update_width(1_000_000), table).maximum
    if natural <= out.width:
        out.print(table)
        return
    headers = [_plain(column.header) for column in table.columns]
    rows = [[_plain(cell) for cell in column.cells] for column in table.columns]
    records = [dict(zip(headers, values, strict=True)) for values in zip(*rows, strict=True)]
    print_rows(records, headers, title=_plain(table.title) if table.title else None, out=out, vertical=True)


def runs_command(
    runs_dir: RunsDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per run.")] = False,
) -> None:
    """List the runs with their status (completed, failed, halted, running, unknown), start time, task,
    host, final accuracy and parameters."""
    from esper.nissa.runs import find_runs, run_info

    root = runs_root(runs_dir)
    try:
        infos = [run_info(path) for path in find_runs(root)]
    except EsperError as exc:
        raise _fail("esper runs failed", str(exc), 2) from exc
    if as_json:
        for info in infos:
            console.print_json(json.dumps(info.to_json()))
        return
    if not infos:
        console.print(f"no runs under {root}")
        return
    rows = []
    for info in infos:
        params = "-" if info.params_final is None else str(info.params_final)
        if info.params_initial is not None and info.params_initial != info.params_final:
            params = f"{info.params_initial}->{params}"
        status = info.status if not info.reason else f"{info.status}: {info.reason}"
        rows.append(
            {
                "run": info.run_id,
                "status": status,
                "started": info.started_at.strftime("%Y-%m-%d %H:%M") if info.started_at else None,
                "task": info.task,
                "host": info.host,
                "accuracy": None if info.final_accuracy is None else f"{info.final_accuracy:.4f}",
                "params": params,
            }
        )
    print_rows(rows, ["run", "status", "started", "task", "host", "accuracy", "params"], title=str(root))


def sql_command(
    statement: Annotated[str, typer.Argument(help='A DuckDB query, e.g. "SELECT * FROM runs".')],
    runs_dir: RunsDirOption = None,
    output: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
) -> None:
    """Query every run's history with DuckDB. Tables: runs, metrics, events, decisions, decision_records
    and field_reports (decoded protobuf as columns); each row has its run_id."""
    import csv
    import sys

    from esper.nissa.sql import open_history, query

    if output not in ("table", "json", "csv"):
        raise _fail("esper sql failed", f"--format must be table, json or csv, not {output!r}", 2)
    try:
        connection = open_history(runs_root(runs_dir))
        try:
            columns, rows = query(connection, statement)
        finally:
            connection.close()
    except EsperError as exc:
        raise _fail("esper sql failed", str(exc), 2) from exc
    if output == "json":
        for row in rows:
            print(json.dumps(dict(zip(columns, row, strict=True)), default=str))
    elif output == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        print_rows([dict(zip(columns, row, strict=True)) for row in rows], columns)


def compare_command(
    runs: Annotated[list[str], typer.Argument(help="Run directories, or run ids under --runs-dir.")],
    runs_dir: RunsDirOption = None,
    out: Annotated[
        Path, typer.Option("--out", help="Where the plots are written.", show_default=True)
    ] = Path("esper-compare"),
) -> None:
    """Compare runs: a table of their figures, and plots of accuracy against parameters (and against
    training FLOPs where recorded) and of the growth timeline."""
    from esper.nissa.compare import COLUMNS, comparison_rows, write_comparison
    from esper.nissa.runs import load_run, resolve_run

    root = runs_root(runs_dir)
    try:
        loaded = [load_run(resolve_run(name, root)) for name in runs]
    except EsperError as exc:
        raise _fail("esper compare failed", str(exc), 2) from exc
    print_rows(comparison_rows(loaded), COLUMNS)
    files = write_comparison(loaded, out)
    for image in files.images:
        console.print(f"plot: {image}")
    for note in files.notes:
        console.print(f"note: {note}")


def watch_command(
    run_dir: Annotated[
        Path | None,
        typer.Argument(
            help="The run directory (or run id under --runs-dir) [the newest run].", show_default=False
        ),
    ] = None,
    runs_dir: RunsDirOption = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, max=3600.0, help="Seconds between reads.")
    ] = 1.0,
) -> None:
    """A live terminal view of a run while it grows (or after): curves, parameters, lifecycles, the last
    decisions and their reasons, deadline misses, the field-report outbox and the bus's health. It reads
    the run's files; no server is needed, so it works over SSH. Keys: q quits, r reads now."""
    from esper.nissa.runs import find_runs, resolve_run
    from esper.nissa.watch import WatchApp

    root = runs_root(runs_dir)
    try:
        if run_dir is None:
            runs = find_runs(root)
            if not runs:
                raise _fail("esper watch failed", f"no runs under {root}", 2)
            path = runs[-1]
        else:
            path = resolve_run(str(run_dir), root)
        app = WatchApp(path, interval_s=interval)
    except EsperError as exc:
        raise _fail("esper watch failed", str(exc), 2) from exc
    app.run()


def write_exports(run_dir: Path) -> None:
    """The run's TensorBoard event files and metrics CSV (written at the end of `esper run`)."""
    from esper.nissa.tensorboard import export_run

    try:
        files = export_run(run_dir)
    except (EsperError, OSError) as exc:
        raise _fail("the run finished but its TensorBoard export failed", str(exc)) from exc
    console.print(f"tensorboard: {files.tensorboard_dir}")
    console.print(f"metrics csv: {files.csv}")


def tensorboard_command(
    runs: Annotated[list[str], typer.Argument(help="Run directories, or run ids under --runs-dir.")],
    runs_dir: RunsDirOption = None,
) -> None:
    """Write a run's TensorBoard event files (RUN_DIR/tensorboard: scalars, parameters, growth events as
    text) and RUN_DIR/metrics.csv; `esper run` writes them at its end. View with
    `tensorboard --logdir <ESPER_DATA_DIR>/runs`."""
    from esper.nissa.runs import resolve_run

    root = runs_root(runs_dir)
    try:
        paths = [resolve_run(name, root) for name in runs]
    except EsperError as exc:
        raise _fail("esper tensorboard failed", str(exc), 2) from exc
    for path in paths:
        write_exports(path)


def dashboard_command(
    runs_dir: RunsDirOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8050,
    refresh: Annotated[
        int,
        typer.Option("--refresh", min=1, max=3600, help="Seconds between reloads of a running run's page."),
    ] = 5,
) -> None:
    """Serve every run in the browser: the run list, each run's page (curves, lifecycles, growth, last
    decisions) and a comparison page. Charts are drawn on the server; the pages need no internet."""
    import uvicorn

    from esper.nissa.dashboard import create_app

    root = runs_root(runs_dir)
    if not root.is_dir():
        raise _fail("esper dashboard failed", f"no such folder of runs: {root}", 2)
    console.print(f"dashboard of {root} on http://{host}:{port}/ (Ctrl-C stops it)")
    uvicorn.run(create_app(root, refresh_s=refresh), host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    """Add the observing commands to `app`, and `-h` beside `--help` on every command."""
    app.info.context_settings = {**(app.info.context_settings or {}), "help_option_names": ["-h", "--help"]}
    app.command("runs")(runs_command)
    app.command("sql")(sql_command)
    app.command("compare")(compare_command)
    app.command("watch")(watch_command)
    app.command("tensorboard")(tensorboard_command)
    app.command("dashboard")(dashboard_command)
