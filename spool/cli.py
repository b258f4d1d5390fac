"""The `spool` command: a thin click client of the library. Errors become one line and an exit status here."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from spool import config as configuration
from spool.errors import InvalidRecord, SpoolError

EXIT_USAGE = 2


class SpoolCommandError(click.ClickException):
    """A library error shown as one line; its exit status comes from the error's class."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class SpoolGroup(click.Group):
    """The one place where exceptions turn into one-line messages (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except SpoolError as exc:
            if ctx.meta.get("spool.debug"):
                raise
            raise SpoolCommandError(str(exc), exc.exit_status) from None
        except BrokenPipeError:
            sys.stderr.close()  # the reader went away (e.g. `| head`): not an error worth a message
            raise click.exceptions.Exit(1) from None
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
    """What the group's options say, turned into a Config on demand (so `spool add` stays cheap)."""

    def __init__(self, db: str | None, config_file: str | None):
        self.db = db
        self.config_file = config_file

    def config(self, **flags: Any) -> configuration.Config:
        return configuration.load(self.config_file, db=self.db, **flags)

    def spool(self, config: configuration.Config | None = None) -> Any:
        from spool.api import Spool

        return Spool.from_config(config or self.config())


pass_context = click.make_pass_decorator(Context)


@click.group(cls=SpoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", metavar="PATH", envvar="SPOOL_DB",
              help="Spool file. Env SPOOL_DB; default $XDG_STATE_HOME/spool/spool.db.")
@click.option("--config", "config_file", metavar="FILE", envvar="SPOOL_CONFIG",
              type=click.Path(dir_okay=False), help="TOML config file. Env SPOOL_CONFIG.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="stathat-spool", prog_name="spool")
@click.pass_context
def cli(ctx: click.Context, db: str | None, config_file: str | None, debug: bool) -> None:
    """Spool StatHat stats durably on this machine and ship them when the network is up.

    Example: spool add "jobs done" --count 1 && spool status
    """
    ctx.meta["spool.debug"] = debug
    ctx.obj = Context(db, config_file)


def _number(field: str) -> Callable[[click.Context, click.Parameter, str | None], int | float | None]:
    """A click callback reading a number; range rules are applied with the record (and the config)."""
    def convert(ctx: click.Context, param: click.Parameter, text: str | None) -> int | float | None:
        from spool.records import number_from_text

        if text is None:
            return None
        try:
            return number_from_text(text, field)
        except InvalidRecord as exc:
            raise click.BadParameter(exc.reason) from None
    return convert


@cli.command()
@click.argument("stat", required=False)
@click.option("--count", metavar="N", callback=_number("count"), help="Add N to a counter.")
@click.option("--value", metavar="V", callback=_number("value"), help="Record a value V.")
@click.option("--t", "t", metavar="UNIX", callback=_number("t"), help="Unix time in seconds (default: now).")
@click.option("--ezkey", metavar="KEY", help="EZ account key for this record (prefer the SPOOL_EZKEY env).")
@click.option("--key", metavar="KEY", help="Classic API: the stat's private key.")
@click.option("--ukey", metavar="UKEY", help="Classic API: your user key.")
@pass_context
def add(obj: Context, stat: str | None, count: float | None, value: float | None, t: int | None,
        ezkey: str | None, key: str | None, ukey: str | None) -> None:
    """Append one stat record to the spool; returns once it is on disk.

    Example: spool add "messages sent~total,female" --count 1 --t 1363118126
    """
    from spool.records import make_record

    config = obj.config()
    try:
        record = make_record(stat=stat, count=count, value=value, t=t, ezkey=ezkey, key=key, ukey=ukey,
                             t_floor=config.t_floor)
    except InvalidRecord as exc:
        raise click.UsageError(exc.reason) from None
    with obj.spool(config) as sp:
        sp.append(record)


@cli.command("import")
@click.argument("file", default="-", type=click.Path(allow_dash=True, dir_okay=False))
@click.option("--skip-invalid", is_flag=True, help="Take the good records and report each bad one.")
@click.option("--ezkey", metavar="KEY", help="EZ key for records that carry none (prefer SPOOL_EZKEY).")
@pass_context
def import_(obj: Context, file: str, skip_invalid: bool, ezkey: str | None) -> None:
    """Append records from JSON lines or a StatHat JSON body, in one transaction.

    All or nothing unless --skip-invalid: an invalid record is reported with its line and nothing is
    committed.

    Example: spool import stats.jsonl
    """
    from spool.formats import read_json_stream, to_records
    from spool.records import now

    config = obj.config()
    skipped: list[InvalidRecord] = []

    def report(error: InvalidRecord) -> None:
        skipped.append(error)
        click.echo(f"skipped {error}", err=True)

    size = os.stat(file).st_size if file != "-" and os.path.isfile(file) else 0
    with obj.spool(config) as sp, click.open_file(file, "rb") as stream, \
            _progress(None, size, "importing", of_bytes=True) as bar:
        counted = _CountingReader(stream, bar.update) if bar is not None else stream
        records = to_records(read_json_stream(counted), ezkey=ezkey, clock_now=now(), t_floor=config.t_floor,
                             on_invalid=report if skip_invalid else None)
        taken = sp.append_records(records)
    click.echo(f"imported {taken} records" + (f", skipped {len(skipped)} invalid" if skipped else ""),
               err=True)


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--skip-invalid", is_flag=True, help="Take a file's good records; report the bad ones.")
@click.option("--keep", is_flag=True, help="Leave files where they are (their digest still stops a re-ingest).")
@pass_context
def ingest(obj: Context, files: tuple[Path, ...], skip_invalid: bool, keep: bool) -> None:
    """Ingest record files (.jsonl, .ndjson, .json, .csv, optionally .gz) once each, as the watcher does.

    Each file is one transaction. Afterwards it moves to .done/ (or .rejected/, with NAME.error.txt) beside
    it. The same file is never taken twice: with --keep, running this again takes only what was appended to
    it since. Exit 2 if any file was rejected.

    Example: spool ingest /var/spool/drop/batch-0001.jsonl.gz
    """
    from spool.store import Store
    from spool.watch import Ingestor

    config = obj.config()
    rejected = 0
    with Store.for_config(config) as store:
        ingestor = Ingestor(store, skip_invalid=skip_invalid, t_floor=config.t_floor)
        for path in files:
            for attempt in range(5):  # a file being written, or appended to while it was moved: read again
                result = ingestor.ingest(path, move=not keep)
                if result.outcome != "changing" and (keep or result.moved_to is not None or not path.exists()
                                                     or result.outcome == "rejected"):
                    break
                click.echo(result.describe(), err=True)
                time.sleep(0.2 * (attempt + 1))
            if result.outcome == "vanished":
                raise SpoolCommandError(f"no such file: {path}", 1)
            rejected += result.outcome in ("rejected", "failed")
            click.echo(result.describe(), err=True)
    if rejected:
        raise SpoolCommandError(f"{rejected} of {len(files)} files rejected", EXIT_USAGE)


@cli.command()
@click.argument("directories", nargs=-1, required=True,
                type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--poll", is_flag=True, help="Poll instead of inotify (NFS, some FUSE mounts).")
@click.option("--poll-interval", metavar="SECONDS", default="1", help="With --poll: how often. Default 1.")
@click.option("--skip-invalid", is_flag=True, help="Take a file's good records; report the bad ones.")
@click.option("--delete", is_flag=True, help="Delete ingested files instead of moving them to .done/.")
@pass_context
def watch(obj: Context, directories: tuple[Path, ...], poll: bool, poll_interval: str, skip_invalid: bool,
          delete: bool) -> None:
    """Watch directories in the foreground and ingest every file renamed or written into them.

    Producers write a temporary name (dotfiles, *.tmp, *.part are ignored) and rename it into place.
    Runs until SIGINT/SIGTERM; `spool run` does the same for the [[watch]] tables of the config.

    Example: spool watch /var/spool/drop
    """
    config = obj.config()
    entries = tuple(configuration.watch_entry(
        {"path": str(d), "poll": poll, "poll_interval": poll_interval, "skip_invalid": skip_invalid,
         "after": "delete" if delete else "move"}, "--") for d in directories)
    _run_agent(config.replace(watch=entries), ship=False)


@cli.command()
@click.option("--listen", metavar="HOST:PORT", help="Where to take StatHat calls. Default 127.0.0.1:8080.")
@click.option("--statsd", metavar="HOST:PORT", help="Also take StatsD over UDP here (e.g. 127.0.0.1:8125).")
@click.option("--allow-remote", is_flag=True, default=None, help="Allow listening on a non-loopback address.")
@pass_context
def relay(obj: Context, listen: str | None, statsd: str | None, allow_remote: bool | None) -> None:
    """Run a local StatHat-compatible endpoint that spools every stat it is sent.

    Point your StatHat client at http://127.0.0.1:8080 instead of the API; each call is answered as StatHat
    would, once its records are on disk. Runs until SIGINT/SIGTERM; `spool run` runs it too when
    [relay] enabled = true. It does not ship: run `spool run` (or `spool ship`) for that.

    Example: spool relay --listen 127.0.0.1:8080 --statsd 127.0.0.1:8125
    """
    config = obj.config()
    flags = {k: v for k, v in {"listen": listen, "statsd": statsd, "allow_remote": allow_remote}.items()
             if v is not None}
    relay_config = configuration.relay_table({**flags, "enabled": True}, "--", base=config.relay)
    _run_agent(config.replace(relay=relay_config, watch=()), ship=False)


def _when_option(text: str | None, name: str) -> int | None:
    """Read a time given as unix seconds or as an ISO 8601 date/time (UTC unless it says otherwise)."""
    if text is None:
        return None
    import datetime

    if text.strip().lstrip("-").isdigit():
        return int(text)
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(f"'{text}' is neither unix seconds nor an ISO date like 2026-11-20T08:00",
                                 param_hint=name) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)  # not datetime.UTC: 3.11+
    return int(when.timestamp())


def _progress(items: Any, length: int, label: str, *, of_bytes: bool = False) -> Any:
    """A progress bar on stderr when it is a terminal; nothing (the bare iterable, or None) when it is not.

    Only for work big enough to watch: 1,000 records, or 1 MiB (`of_bytes`, shown as a percentage).
    """
    if not sys.stderr.isatty() or length < (1 << 20 if of_bytes else 1000):
        return contextlib.nullcontext(items)
    return click.progressbar(items, length=length, label=label, file=sys.stderr, show_eta=True,
                             show_pos=not of_bytes, show_percent=of_bytes)


class _CountingReader:
    """A binary stream that reports how many bytes were read through it (for a progress bar)."""

    def __init__(self, stream: Any, update: Callable[[int], object]):
        self._stream = stream
        self._update = update

    def readline(self, size: int = -1) -> bytes:
        line = self._stream.readline(size)
        self._update(len(line))
        return line

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._update(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@cli.command()
@click.option("--since", metavar="WHEN", required=True, help="Records with t at or after (unix or ISO date).")
@click.option("--until", metavar="WHEN", help="Records with t at or before (unix or ISO date).")
@click.option("--stat", "stat_glob", metavar="GLOB", help="Only stats matching this glob, e.g. 'api *'.")
@click.option("--dry-run", is_flag=True, help="Say how many would be queued; change nothing.")
@pass_context
def replay(obj: Context, since: str, until: str | None, stat_glob: str | None, dry_run: bool) -> None:
    """Send retained, already-delivered records again (StatHat adds counts again).

    Copies of the sent records still kept (see spool.retention) are queued and shipped, paced, like any
    backlog. Use it when StatHat lost data or a stat was deleted there.

    Example: spool replay --since 2026-11-20 --until 2026-11-21 --stat 'api *' --dry-run
    """
    start, end = _when_option(since, "--since"), _when_option(until, "--until")
    with obj.spool() as sp:
        n = sp.store.count_selected("sent", since=start, until=end, stat_glob=stat_glob)
        if not dry_run and n:
            n = sp.store.replay(since=start, until=end, stat_glob=stat_glob)
    verb = "would queue" if dry_run else "queued"
    click.echo(f"{verb} {n} sent records to be shipped again; StatHat will count them again "
               "(counters add up, values are averaged in)", err=True)


@cli.command()
@click.argument("file", default="-", type=click.Path(allow_dash=True, dir_okay=False))
@click.option("--state", type=click.Choice(["pending", "sent", "dead", "all"]), default="pending",
              show_default=True, help="Which records ('all': pending, sent and dead).")
@click.option("--since", metavar="WHEN", help="Records with t at or after (unix or ISO date).")
@click.option("--until", metavar="WHEN", help="Records with t at or before (unix or ISO date).")
@click.option("--remove", is_flag=True, help="Move the records: each chunk is deleted here once it is synced to "
                                             "FILE (to move backlog to another machine without sending it twice).")
@click.option("--append", "append", is_flag=True, help="Append to FILE if it exists (it is refused otherwise).")
@pass_context
def export(obj: Context, file: str, state: str, since: str | None, until: str | None, remove: bool,
           append: bool) -> None:
    """Write records as JSON lines that `spool import` reads back unchanged.

    The file holds keys (records' own ezkey, classic keys) so it can be shipped from elsewhere: it is created
    readable by its owner only, and an existing file is refused unless --append. Records in flight are not
    exported; held records (stamped while the clock was wrong) cannot be, until their time is known.

    Example: spool export --state pending --remove /media/usb/backlog.jsonl
    """
    import json

    start, end = _when_option(since, "--since"), _when_option(until, "--until")
    if remove and file == "-":
        raise click.UsageError("--remove needs a FILE: records must be on disk before they leave the spool")

    def lines(records: Any) -> str:
        return "".join(json.dumps(record.to_dict(), ensure_ascii=False) + "\n" for record in records)

    with obj.spool() as sp:
        total = sp.store.count_selected(state, since=start, until=end)
        held = sp.store.counts()["held"] if state == "all" else 0
        with _private_output(file, append) as out:
            if remove:
                with _progress(None, total, "exporting") as bar:
                    def write(records: list[Any]) -> None:
                        out.write(lines(records))
                        out.flush()
                        os.fsync(out.fileno())  # on disk before this chunk is deleted from the spool
                        if bar is not None:
                            bar.update(len(records))
                    n = sp.store.move_out(state, write, since=start, until=end)
            else:
                n = 0
                with _progress(sp.store.export(state, since=start, until=end), total, "exporting") as rows:
                    for _, record in rows:
                        out.write(lines([record]))
                        n += 1
    note = f", {held} held records left out (their time is not known yet)" if held else ""
    click.echo(f"exported {n} records" + (" and removed them from this spool" if remove else "") + note, err=True)


@contextlib.contextmanager
def _private_output(file: str, append: bool) -> Any:
    """Open the export target: stdout for '-', else a file readable by its owner only, synced on close."""
    if file == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    from spool.durable import open_private

    try:
        fd = open_private(Path(file), append=append)
    except FileExistsError:
        raise SpoolCommandError(f"{file} exists; give another name, or --append to add to it", 1) from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        yield out
        out.flush()
        os.fsync(out.fileno())


@cli.command()
@pass_context
def doctor(obj: Context) -> None:
    """Check the setup: config, key, endpoint, clock, disk, spool, watched directories, relay port.

    Each check prints one line, with a fix when it fails. Exit 1 if any check failed.

    Example: spool --config /etc/spool/spool.toml doctor
    """
    from spool.doctor import Verdict, checks
    from spool.errors import ConfigError

    try:
        verdicts = list(checks(obj.config(), config_file=obj.config_file))
    except ConfigError as exc:
        verdicts = [Verdict("config", False, str(exc), "fix the configuration (see packaging/spool.toml)")]
    for verdict in verdicts:
        mark = "ok  " if verdict.ok else "FAIL"
        fix = "" if verdict.ok or not verdict.fix else f" -- fix: {verdict.fix}"
        click.echo(f"{mark} {verdict.name}: {one_line(verdict.detail)}{fix}")
    failed = [v.name for v in verdicts if not v.ok]
    if failed:
        raise SpoolCommandError(f"{len(failed)} check(s) failed: {', '.join(failed)}", 1)


def _run_agent(config: configuration.Config, *, ship: bool = True) -> None:
    """Run the agent in the foreground with its logging, and exit with its status."""
    from spool.agent import Agent, setup_logging

    setup_logging(config.log_level)
    raise click.exceptions.Exit(Agent(config, ship=ship).run())


def _shipping_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--endpoint", metavar="URL", help="StatHat base URL (env SPOOL_ENDPOINT)."),
        click.option("--ezkey", metavar="KEY", help="Default EZ key (prefer SPOOL_EZKEY or ship.ezkey_file)."),
        click.option("--batch-size", type=int, metavar="N", help="Records per JSON batch (max 1000)."),
        click.option("--timeout", metavar="SECONDS", help="HTTP timeout per request."),
        click.option("--allow-insecure", is_flag=True, default=None,
                     help="Allow a plain http:// endpoint on a remote host."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@_shipping_options
@click.option("--once", is_flag=True, help="Deliver what is pending, then exit.")
@click.option("--max-time", metavar="SECONDS", default="300",
              help="With --once: give up (exit 1) after this long. Default 300.")
@pass_context
def ship(obj: Context, once: bool, max_time: str, **flags: Any) -> None:
    """Deliver pending records to StatHat; with --once, exit when done.

    Without --once it runs until SIGINT/SIGTERM, then hands back its batch and exits 0.

    Example: SPOOL_EZKEY_FILE=/etc/spool/ezkey spool ship --once --max-time 60
    """
    from spool.agent import setup_logging
    from spool.ship import Shipper
    from spool.store import Store

    config = obj.config(**flags)
    if not once:
        _run_agent(config)
    setup_logging(config.log_level)
    deadline = configuration.parse_duration(max_time, "--max-time")
    with Store.for_config(config) as store, Shipper(store, config) as shipper, \
            _progress(None, store.backlog()[0], "shipping") as bar:
        result = shipper.drain(max_time=deadline, fail_fast=True, on_progress=bar.update if bar else None)
        left = store.counts()["pending"]
        keyless = store.keyless_pending() if config.ezkey is None else 0
    click.echo(f"shipped {shipper.stats.sent}, dead {shipper.stats.dead}", err=True)
    if keyless:
        click.echo(f"warning: {keyless} records have no ezkey and none is configured; they stay pending",
                   err=True)
    if not result.done:
        raise SpoolCommandError(f"{left} records still pending: {result.reason}", 1)


@cli.command()
@_shipping_options
@pass_context
def run(obj: Context, **flags: Any) -> None:
    """Run the agent: ship continuously until SIGTERM/SIGINT.

    Example: SPOOL_CONFIG=/etc/spool/spool.toml spool run
    """
    config = obj.config(**flags)
    _run_agent(config)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_context
def status(obj: Context, as_json: bool) -> None:
    """Show the backlog, dead letters, the last shipping attempt and anything stuck.

    Example: spool status --json
    """
    import json

    config = obj.config()
    with obj.spool(config) as sp:
        report = sp.status(config)
    if as_json:
        click.echo(json.dumps(report, sort_keys=True))
        return
    click.echo(format_status(report))


def format_status(report: dict[str, Any]) -> str:
    """Render a status report for people."""
    oldest = ""
    if report["oldest_pending_t"] is not None:
        oldest = f"   oldest {_when(report['oldest_pending_t'])} ({_age(report['oldest_pending_age'])} ago)"
    shipper = f"running (pid {report['shipper_pid']})" if report["shipper_pid"] else "not running"
    lines = [
        f"spool {report['path']} ({report['size_bytes'] / 1048576:.1f} MiB)",
        f"  pending    {report['pending']}{oldest}",
        f"  in flight  {report['inflight']}",
        f"  sent       {report['sent']}   (kept for replay until pruned)",
        f"  dead       {report['dead']}",
        f"  held       {report['held']}   (stamped while the clock was wrong)",
        f"shipper      {shipper}",
    ]
    if report["last_attempt_at"] is not None:
        result = report["last_result"] + (f": {report['last_error']}" if report["last_error"] else "")
        lines.append(f"last attempt {_when(report['last_attempt_at'])}: {result}")
    if report["last_success_at"] is not None:
        lines.append(f"last success {_when(report['last_success_at'])}")
    if report["counters"]:
        lines.append("counters     " + ", ".join(f"{k} {v}" for k, v in sorted(report["counters"].items())))
    lines += [f"problem: {problem}" for problem in report["problems"]]
    return "\n".join(lines)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@cli.group(cls=SpoolGroup)
def dead() -> None:
    """Inspect, requeue or purge records the receiver refused.

    Example: spool dead list
    """


@dead.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--limit", type=click.IntRange(min=1), help="Show at most this many.")
@pass_context
def dead_list(obj: Context, as_json: bool, limit: int | None) -> None:
    """List dead records with the receiver's reason (keys are never shown).

    Example: spool dead list --limit 20
    """
    import json

    with obj.spool() as sp:
        rows = sp.dead(limit)
    for row in rows:
        record = row["record"]
        shown = {"id": row["id"], "stat": record.stat if record.stat is not None else "(classic)",
                 "kind": ("count", "value")[record.kind], "number": record.number, "t": record.t,
                 "reason": row["reason"], "http_status": row["http_status"], "dead_at": row["dead_at"]}
        if as_json:
            click.echo(json.dumps(shown, ensure_ascii=False))
        else:
            click.echo(f"{row['id']}\t{shown['stat']}\t{shown['kind']}={record.number}\tt={record.t}\t"
                       f"{row['reason']}")
    if not rows and not as_json:
        click.echo("no dead records", err=True)


def _ids_or_all(ids: tuple[int, ...], everything: bool) -> list[int] | None:
    if everything == bool(ids):
        raise click.UsageError("give record IDs or --all (not both)")
    return None if everything else list(ids)


@dead.command("requeue")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "everything", is_flag=True, help="Requeue every dead record.")
@pass_context
def dead_requeue(obj: Context, ids: tuple[int, ...], everything: bool) -> None:
    """Return dead records to pending so they are sent again.

    Example: spool dead requeue --all
    """
    with obj.spool() as sp:
        n = sp.requeue_dead(_ids_or_all(ids, everything))
    click.echo(f"requeued {n} records", err=True)


@dead.command("purge")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "everything", is_flag=True, help="Delete every dead record.")
@pass_context
def dead_purge(obj: Context, ids: tuple[int, ...], everything: bool) -> None:
    """Delete dead records for good.

    Example: spool dead purge 17 18
    """
    with obj.spool() as sp:
        n = sp.purge_dead(_ids_or_all(ids, everything))
    click.echo(f"purged {n} records", err=True)


def one_line(message: str) -> str:
    """Escape control characters (an argument may carry a newline) so an error stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every error, usage errors included, is one line on stderr with its exit status."""
    try:
        status = cli.main(args=argv, prog_name="spool", standalone_mode=False)
    except click.ClickException as exc:
        if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # `spool dead`: help, then why
            click.echo(exc.format_message())
            click.echo("spool: error: missing command (see the list above)", err=True)
        else:
            click.echo(f"spool: error: {one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("spool: aborted", err=True)
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)
