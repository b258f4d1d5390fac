"""The `spool` command: a thin click client of the library. Each command parses, makes one call, prints.

This module holds the group, what every command shares, and the producer commands; the rest are in
spool/cli_ops.py, loaded when needed.

Errors become one line and an exit status in one place (SpoolGroup.invoke). Settings flags come from the
declarations in spool/config.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from spool import config as configuration
from spool.errors import InvalidRecord, SpoolError, printable
from spool.records import number_from_text

EXIT_USAGE = 2


def _waits_for_an_operator(exc: Exception) -> bool:
    """A spool that is damaged, or that this user cannot open or write: no later run mends it by itself."""
    from spool.errors import SpoolCorrupt, SpoolUnusable

    return isinstance(exc, (SpoolCorrupt, SpoolUnusable))


class SpoolCommandError(click.ClickException):
    """A library error shown as one line; its exit status comes from the error's class."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]


class SpoolGroup(click.Group):
    """The one place where exceptions turn into one-line messages (a traceback only with --debug).

    `more_commands` names a module that registers further commands on this group when imported: it is
    imported only when a command is named that the group does not have yet, or when they are all listed.
    """

    more_commands: str | None = None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and self._register_more():
            command = super().get_command(ctx, cmd_name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._register_more()
        return super().list_commands(ctx)

    def _register_more(self) -> bool:
        module, self.more_commands = self.more_commands, None
        if module is None:
            return False
        importlib.import_module(module)
        return True

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except SpoolError as exc:
            if ctx.meta.get("spool.debug"):
                raise
            status = exc.exit_status
            if ctx.invoked_subcommand in ("status", "ship") and _waits_for_an_operator(exc):
                status = 2  # their documented "failing: an operator must act", not "the link failed" (1)
            raise SpoolCommandError(str(exc), status) from None
        except BrokenPipeError:
            # The reader went away (`spool export - | head`): one line on stderr, the exit status of SIGPIPE.
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout's own close must not fail again
            raise SpoolCommandError("the output was closed before all of it was written (broken pipe); "
                                    "nothing in the spool changed", 141) from None
        except OSError as exc:
            if ctx.meta.get("spool.debug"):
                raise
            where = f": {exc.filename}" if exc.filename else ""
            raise SpoolCommandError(f"{exc.strerror or exc}{where}", 1) from None
        except Exception as exc:
            if ctx.meta.get("spool.debug"):
                raise
            raise SpoolCommandError(f"internal error: {type(exc).__name__}: {exc} "
                                    "(run with --debug for a traceback)", 1) from None


class Context:
    """The options every command takes (before or after the command's name), made into a Config on demand."""

    def __init__(self) -> None:
        self.config_file: str | None = None
        self.flags: dict[str, Any] = {}

    def config(self, *, uses: tuple[str, ...] | None = None, **flags: Any) -> configuration.Config:
        """Load the configuration; a mistake in a section outside `uses` is one warning line on stderr each."""
        config = configuration.load(self.config_file, uses=uses, **{**self.flags, **flags})
        if config.warnings:
            current = click.get_current_context(silent=True)
            command = f"`{current.command_path}`" if current is not None else "this command"
            for warning in config.warnings:
                click.echo(f"spool: warning: {printable(warning)} ({command} does not use it; `spool run` and "
                           "`spool ship` refuse it)", err=True)
        return config

    def spool(self, *, create: bool = False, uses: tuple[str, ...] | None = None, **flags: Any) -> Any:
        """Open the configured spool; only producers create one (status, dead, export... never do)."""
        from spool.api import Spool

        return Spool.from_config(self.config(uses=uses, **flags), create=create)


PRODUCES = ("spool",)  # what producers (add, import, ingest) use of the configuration: the spool, nothing else


pass_context = click.make_pass_decorator(Context, ensure=True)


def _remember(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A callback storing an option in the Context, so it counts wherever it is given (group or command)."""
    def store(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None and value is not False:
            obj = ctx.ensure_object(Context)
            if name == "config_file":
                obj.config_file = value
            elif name == "debug":
                ctx.meta["spool.debug"] = True
            else:
                obj.flags[name] = value
        return value
    return store


def common_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--config, --db and --debug, taken before or after the command name (`spool run --config F` works)."""
    options = [
        click.option("--config", "config_file", metavar="FILE", expose_value=False,
                     callback=_remember("config_file"), is_eager=True,
                     help="TOML config file (env SPOOL_CONFIG; default /etc/spool/spool.toml if it exists)."),
        click.option("--db", metavar="PATH", expose_value=False, callback=_remember("spool.path"), is_eager=True,
                     help="Spool file (env SPOOL_DB; default $XDG_STATE_HOME/spool/spool.db)."),
        click.option("--debug", is_flag=True, expose_value=False, callback=_remember("debug"), is_eager=True,
                     help="Show tracebacks for errors."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def settings_options(*sections: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The flags declared for the settings of these config sections (see spool/config.py)."""
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for section in reversed(sections):
            for field in reversed(dataclasses.fields(configuration.SECTIONS[section])):
                meta = field.metadata
                if not meta["flag"]:
                    continue
                boolean = isinstance(meta["kind"], configuration.Boolean)
                help_text = meta["help"][0].upper() + meta["help"][1:] + "."
                command = click.option(meta["flag"], f"{section}__{field.name}", is_flag=boolean, default=None,
                                       expose_value=False, callback=_remember(f"{section}.{field.name}"),
                                       metavar=None if boolean else field.name.upper(), help=help_text)(command)
        return command
    return decorate


def log_options(command: Callable[..., Any]) -> Callable[..., Any]:
    return settings_options("log")(command)


@click.group(cls=SpoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@common_options
@click.version_option(package_name="stathat-spool", prog_name="spool")
def cli() -> None:
    """Spool StatHat stats durably on this machine and ship them when the network is up.

    Example: spool add "jobs done" --count 1 && spool status
    """


# The producer commands (add, import, ingest: other programs run them once per stat or file, so each start
# counts) are defined below; the others, in spool/cli_ops.py, are built only when one of them is asked for.
cli.more_commands = "spool.cli_ops"


class Number(click.ParamType):
    """A number from the command line, read as StatHat reads one: "5" stays an integer, "0.75" is a float."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | float:
        if isinstance(value, int | float):
            return value
        try:
            return number_from_text(str(value), param.name if param and param.name else "number")
        except InvalidRecord as exc:  # one line, as the record's other errors ("count must be a finite number")
            raise click.UsageError(exc.reason, ctx) from None


class When(Number):
    """A record's time: unix seconds, read as StatHat reads a number, or an ISO date as --since takes one."""

    name = "when"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | float:
        try:
            return super().convert(value, param, ctx)
        except click.UsageError:
            if not any(mark in str(value) for mark in "-:T") or str(value).strip().startswith("-"):
                raise  # a number after all, or nothing like a date: the number's own error says why
        from spool.api import parse_when

        flag = f"--{param.name}" if param is not None and param.name else "time"
        try:
            return parse_when(str(value), flag)
        except SpoolError as exc:
            raise click.UsageError(str(exc), ctx) from None


@cli.command()
@click.argument("stat", required=False)
@click.option("--count", metavar="N", type=Number(), help="Add N to a counter.")
@click.option("--value", metavar="V", type=Number(), help="Record a value V.")
@click.option("--t", "t", metavar="WHEN", type=When(), help="Unix time in seconds, or an ISO date or time (UTC "
              "unless it names a zone: 2026-12-01T08:00); default: now.")
@click.option("--ezkey", metavar="KEY", help="EZ account key for this record (prefer the configured key file).")
@click.option("--key", metavar="KEY", help="Classic API: the stat's private key.")
@click.option("--ukey", metavar="UKEY", help="Classic API: your user key.")
@common_options
@pass_context
def add(obj: Context, stat: str | None, count: float | None, value: float | None, t: float | None,
        ezkey: str | None, key: str | None, ukey: str | None) -> None:
    """Append one stat record to the spool; returns once it is on disk.

    Example: spool add "messages sent~total,female" --count 1 --t 1363118126
    """
    missing = [*(["STAT (or --key and --ukey)"] if stat is None and key is None and ukey is None else []),
               *(["--count N or --value V"] if count is None and value is None and key is None else [])]
    if missing:  # said in the command's words, all of it at once
        raise click.UsageError(f"missing {' and '.join(missing)}: spool add STAT --count N (or --value V)")
    fields = {"stat": stat, "count": count, "value": value, "t": t, "ezkey": ezkey, "key": key, "ukey": ukey}
    with obj.spool(create=True, uses=PRODUCES) as sp:
        try:
            sp.add({name: v for name, v in fields.items() if v is not None})
        except InvalidRecord as exc:
            raise click.UsageError(exc.reason) from None


@cli.command("import")
@click.argument("file", default="-", type=click.Path(allow_dash=True, dir_okay=False))
@click.option("--skip-invalid", is_flag=True, help="Take the good records and report each bad one.")
@click.option("--ezkey", metavar="KEY", help="EZ key for records that carry none (prefer the configured key file).")
@common_options
@pass_context
def import_(obj: Context, file: str, skip_invalid: bool, ezkey: str | None) -> None:
    """Append records from JSON lines or a StatHat JSON body (FILE, or - for stdin).

    All or nothing unless --skip-invalid: every invalid line is reported (up to 1,000) and nothing is
    committed. CSV and .gz files are read by `spool ingest`.

    Example: spool import stats.jsonl
    """
    if file != "-" and file.lower().endswith((".csv", ".gz")):
        raise click.UsageError(f"{file} is not JSON: `spool ingest {file}` reads CSV and gzip files "
                               "(as a drop directory does)")
    size = os.stat(file).st_size if file != "-" and os.path.isfile(file) else 0
    with obj.spool(create=True, uses=PRODUCES) as sp, click.open_file(file, "rb") as stream, \
            _progress(size, "importing", of_bytes=True) as bar:
        try:
            result = sp.import_lines(stream, ezkey=ezkey, skip_invalid=skip_invalid,
                                     on_progress=bar.update if bar else None)
        except InvalidRecord as exc:
            for error in getattr(exc, "errors", ())[1:]:
                click.echo(f"invalid {printable(str(error))}", err=True)
            raise
    for error in result.invalid:
        click.echo(f"skipped {printable(str(error))}", err=True)
    skipped = f", skipped {_n(len(result.invalid), 'invalid line')}" if result.invalid else ""
    click.echo(f"imported {_n(result.taken, 'record')}{skipped}", err=True)


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--skip-invalid", is_flag=True, help="Take a file's good records; report the bad ones.")
@click.option("--keep", is_flag=True, help="Leave files where they are (run again, it takes only what was appended).")
@common_options
@pass_context
def ingest(obj: Context, files: tuple[Path, ...], skip_invalid: bool, keep: bool) -> None:
    """Ingest record files (.jsonl, .ndjson, .json, .csv, optionally .gz) once each, as the watcher does.

    Each file is one transaction. Afterwards it moves to .done/ (or .rejected/, with NAME.error.txt) beside
    it. The same file is never taken twice: with --keep, running this again takes only what was appended to
    it since. Exit 2 if any file was rejected.

    Example: spool ingest /var/spool/drop/batch-0001.jsonl.gz
    """
    rejected = unmoved = 0
    with obj.spool(create=True, uses=PRODUCES) as sp:
        for path in files:
            result = sp.ingest(path, skip_invalid=skip_invalid, keep=keep)
            if result.outcome == "vanished":
                raise SpoolCommandError(f"no such file: {path}", 1)
            rejected += result.outcome in ("rejected", "failed")
            click.echo(result.describe(), err=True)
            if result.unmoved is not None:
                unmoved += 1
                click.echo(result.describe_unmoved("when this is run again"), err=True)
    if rejected:
        raise SpoolCommandError(f"{rejected} of {_n(len(files), 'file')} rejected", EXIT_USAGE)
    if unmoved:
        raise SpoolCommandError(f"{unmoved} of {_n(len(files), 'file')} could not be moved away", 1)


def _progress(length: int, label: str, *, of_bytes: bool = False) -> Any:
    """A progress bar on stderr when it is a terminal (None when not): for 1,000 records or 1 MiB and more."""
    if not sys.stderr.isatty() or length < (1 << 20 if of_bytes else 1000):
        return contextlib.nullcontext(None)
    return click.progressbar(length=length, label=label, file=sys.stderr, show_eta=True,
                             show_pos=not of_bytes, show_percent=of_bytes)


def _n(count: int, noun: str) -> str:
    """'1 record', '2,000 records'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every error, usage errors included, is one line on stderr with its exit status."""
    try:
        status = cli.main(args=argv, prog_name="spool", standalone_mode=False)
    except click.ClickException as exc:
        if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # `spool dead`: help, then why
            click.echo(exc.format_message())
            click.echo("spool: error: missing command (see the list above)", err=True)
        else:
            click.echo(f"spool: error: {printable(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("spool: aborted", err=True)
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)

