"""Options and output helpers shared by every verb."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from fnmesh.certs.home import Home, open_home
from fnmesh.errors import MeshError

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)


def home_option(f: F) -> F:
    """``--home DIR``: default ``$FNMESH_HOME``, then ``~/.fnmesh``."""
    return click.option(
        "--home",
        "home",
        type=click.Path(file_okay=False),
        default=None,
        help="Home folder (default $FNMESH_HOME, then ~/.fnmesh).",
    )(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def get_home(home: str | None) -> Home:
    return open_home(home)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, header_style="bold")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    console.print(table)


class MeshCommand(click.Command):
    """Turns an fnmesh error into one line on stderr and exit status 1, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MeshError as e:
            err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            ctx.exit(1)


class MeshGroup(click.Group):
    command_class = MeshCommand
    group_class = type


class _LogfmtFormatter:
    """``ts=... level=... logger=... msg="..."``: one line per event, easy to grep and parse."""

    def format(self, record: Any) -> str:
        import time as _t

        msg = record.getMessage().replace('"', "'")
        line = (
            f"ts={_t.strftime('%Y-%m-%dT%H:%M:%S', _t.gmtime(record.created))}Z "
            f'level={record.levelname.lower()} logger={record.name} msg="{msg}"'
        )
        if record.exc_info:
            import traceback

            exc = "".join(traceback.format_exception(*record.exc_info)).strip().replace("\n", " | ")
            line += f' exc="{exc}"'
        return line


def setup_logging(verbose: int) -> None:
    """Quiet by default (warnings and errors); -v for info, -vv for debug."""
    import logging

    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogfmtFormatter())  # type: ignore[arg-type]
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("fnmesh").setLevel(level)


def verbose_option(f: F) -> F:
    return click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")(f)
