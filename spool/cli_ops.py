"""The commands people and the service manager run: the agent and its parts, status, export, replay, doctor, dead.

They are registered on the `spool` group when it first needs a command it does not have (see SpoolGroup in
spool/cli.py): the producer commands there (add, import, ingest), which other programs run once per stat or
file, do not build these commands' options at every start.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from spool import config as configuration
from spool.cli import (
    Context,
    SpoolCommandError,
    SpoolGroup,
    _n,
    _progress,
    cli,
    common_options,
    log_options,
    pass_context,
    settings_options,
)
from spool.clock import utc_text
from spool.errors import printable


@cli.command()
@click.argument("directories", nargs=-1, required=True,
                type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--poll", is_flag=True, help="Poll instead of inotify (NFS, some FUSE mounts).")
@click.option("--poll-interval", metavar="SECONDS", default="1", help="With --poll: how often. Default 1.")
@click.option("--skip-invalid", is_flag=True, help="Take a file's good records; report the bad ones.")
@click.option("--delete", is_flag=True, help="Delete ingested files instead of moving them to .done/.")
@common_options
@log_options
@pass_context
def watch(obj: Context, directories: tuple[Path, ...], poll: bool, poll_interval: str, skip_invalid: bool,
          delete: bool) -> None:
    """Watch directories in the foreground and ingest every file renamed or written into them (no shipping).

    Producers write a temporary name (dotfiles, *.tmp, *.part are ignored) and rename it into place.
    Runs until SIGINT/SIGTERM; `spool run` does the same for the [[watch]] tables of the config.

    Example: spool watch /var/spool/drop
    """
    entries = configuration.distinct_watches(tuple(configuration.watch_entry(
        {"path": str(d), "poll": poll, "poll_interval": poll_interval, "skip_invalid": skip_invalid,
         "after": "delete" if delete else "move"}, "--", text=True) for d in directories), "spool watch")
    # Only the spool and logging settings count here: a mistake elsewhere is a warning (its own drop directories
    # are the ones named on the command line, not the [[watch]] tables).
    _run_agent(lambda: obj.config(uses=("spool", "log")).replace(watch=entries), only=("watch",))


@cli.command()
@settings_options("relay")
@common_options
@log_options
@pass_context
def relay(obj: Context) -> None:
    """Run a local StatHat-compatible endpoint that spools every stat it is sent (no shipping).

    Point your StatHat client at http://127.0.0.1:8080 instead of the API; each call is answered as StatHat
    would, once its records are on disk. Runs until SIGINT/SIGTERM; `spool run` runs it too when
    [relay] enabled = true.

    Example: spool relay --listen 127.0.0.1:8080 --statsd localhost:8125
    """
    _run_agent(obj.config, only=("relay",))


def _when_option(text: str | None, name: str) -> int | None:
    """Read --since/--until: unix seconds or an ISO 8601 date/time (UTC unless it says otherwise)."""
    from spool.api import parse_when

    return None if text is None else parse_when(text, name)


@cli.command()
@click.option("--since", metavar="WHEN", required=True, help="Records with t at or after (unix or ISO date, UTC).")
@click.option("--until", metavar="WHEN", help="Records with t at or before (unix or ISO date, UTC).")
@click.option("--stat", "stat_glob", metavar="GLOB", help="Only stats matching this glob, e.g. 'api *'.")
@click.option("--dry-run", is_flag=True, help="Say how many would be queued; change nothing.")
@common_options
@pass_context
def replay(obj: Context, since: str, until: str | None, stat_glob: str | None, dry_run: bool) -> None:
    """Send retained, already-delivered records again (StatHat adds counts again).

    Copies of the sent records still kept (see spool.retention) are queued and shipped, paced, like any
    backlog. Use it when StatHat lost data or a stat was deleted there.

    Example: spool replay --since 2026-11-20 --until 2026-11-21 --stat 'api *' --dry-run
    """
    start, end = _when_option(since, "--since"), _when_option(until, "--until")
    assert start is not None  # --since is required
    with obj.spool() as sp:
        n = sp.replay(since=start, until=end, stat=stat_glob, dry_run=dry_run)
    verb = "would queue" if dry_run else "queued"
    click.echo(f"{verb} {_n(n, 'sent record')} to be shipped again; StatHat will count them again "
               "(counters add up, values are averaged in)", err=True)


@cli.command()
@click.argument("file", default="-", type=click.Path(allow_dash=True, dir_okay=False))
@click.option("--state", type=click.Choice(["pending", "sent", "dead", "all"]), default="pending",
              show_default=True, help="Which records ('all': pending, sent and dead).")
@click.option("--since", metavar="WHEN", help="Records with t at or after (unix or ISO date, UTC).")
@click.option("--until", metavar="WHEN", help="Records with t at or before (unix or ISO date, UTC).")
@click.option("--remove", is_flag=True, help="Move the records: each chunk is deleted here once it is synced to "
                                             "FILE (to move backlog to another machine without sending it twice).")
@click.option("--append", "append", is_flag=True, help="Append to FILE if it exists (it is refused otherwise).")
@common_options
@pass_context
def export(obj: Context, file: str, state: str, since: str | None, until: str | None, remove: bool,
           append: bool) -> None:
    """Write records as JSON lines that `spool import` reads back unchanged (FILE, or - for stdout).

    The file holds keys (records' own ezkey, classic keys) so it can be shipped from elsewhere: it is created
    readable by its owner only, and an existing file is refused unless --append. Records in flight are not
    exported; held records (stamped while the clock was wrong) cannot be, until their time is known.

    Example: spool export --state pending --remove /media/usb/backlog.jsonl
    """
    if remove and file == "-":
        raise click.UsageError("--remove needs a FILE: records must be on disk before they leave the spool")
    start, end = _when_option(since, "--since"), _when_option(until, "--until")
    with obj.spool() as sp:
        total = sp.count_selected(state, since=start, until=end)
        with _progress(total, "exporting") as bar:
            result = sp.export(sys.stdout if file == "-" else file, state=state, since=start, until=end,
                               remove=remove, append=append, on_progress=bar.update if bar else None)
    note = f", {_n(result.held_left, 'held record')} left out (their time is not known yet)" \
        if result.held_left else ""
    moved = " and removed them from this spool" if remove else ""
    click.echo(f"exported {_n(result.exported, 'record')}{moved}{note}", err=True)


@cli.command()
@settings_options("ship")
@click.option("--once", is_flag=True, help="Deliver what is pending, then exit.")
@click.option("--max-time", metavar="SECONDS", help="With --once: give up (exit 1) after this long. Default 300.")
@common_options
@log_options
@pass_context
def ship(obj: Context, once: bool, max_time: str | None) -> None:
    """Deliver pending records to StatHat; with --once, exit when done (or at once if it cannot work).

    Without --once it ships until SIGINT/SIGTERM (only shipping: `spool run` runs everything configured),
    then hands back its batches and exits 0.

    Example: SPOOL_EZKEY_FILE=/etc/spool/ezkey spool ship --once --max-time 60
    """
    config = obj.config()
    if not once:
        if max_time is not None:
            raise click.UsageError("--max-time applies to --once only; the agent ships until it is stopped")
        _run_agent(obj.config, only=("ship",))
    from spool.agent import setup_logging

    setup_logging(config.log.level, config.log.format)
    limit = configuration.Duration().parse(max_time or "300", "--max-time", True)
    stop = threading.Event()  # SIGTERM/SIGINT: the answers in flight are awaited and the batches handed back

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with obj.spool() as sp, _progress(sp.backlog(), "shipping") as bar:
            result = sp.ship_once(max_time=limit, on_progress=bar.update if bar else None, shutdown=stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    expired = f", dropped {result.expired:,} older than max_age" if result.expired else ""
    click.echo(f"shipped {result.sent:,}, dead {result.dead:,}{expired}", err=True)
    if stop.is_set() and result.outcome == "link":
        raise SpoolCommandError(f"stopped by a signal: {_n(result.pending, 'record')} still pending (a later run "
                                "delivers them)", SHIP_EXIT["link"])
    if result.outcome != "delivered":
        raise SpoolCommandError(_undelivered(result), SHIP_EXIT[result.outcome])


# `ship --once`'s exit status, by what the records it could not deliver wait for (README: CLI reference).
SHIP_EXIT = {"delivered": 0, "link": 1, "operator": 2}


def _undelivered(result: Any) -> str:
    """Why records are left (or were refused), in one line: each reason, with what to do."""
    reasons = []
    if result.keyless:
        from spool.health import keyless_words

        reasons.append(keyless_words(result.keyless, result.keyless_more, "record"))
    if result.held:
        reasons.append(f"{_n(result.held, 'record')} stamped while the system clock was wrong, held until it is "
                       "right (start NTP: timedatectl set-ntp true)")
    if not result.done and result.reason:
        reasons.append(result.reason if result.operator else f"{result.reason} (the link failed; a later run "
                       "retries)")
    if result.dead:
        reasons.append(f"{_n(result.dead, 'record')} refused by the receiver (see `spool dead list`)")
    left = f"{_n(result.pending + result.held, 'record')} still pending: " if result.pending + result.held else ""
    return left + "; ".join(reasons)


@cli.command()
@settings_options("ship")
@common_options
@log_options
@pass_context
def run(obj: Context) -> None:
    """Run the agent: ship, and watch, relay and serve metrics as configured, until SIGTERM/SIGINT.

    SIGHUP reads the configuration again and restarts only what changed (an invalid one is refused and the
    running one kept). Under systemd (Type=notify) it reports READY, RELOADING, STOPPING and watchdog pings.

    Example: SPOOL_CONFIG=/etc/spool/spool.toml spool run
    """
    _run_agent(obj.config)


def _run_agent(load: Callable[[], configuration.Config], *, only: tuple[str, ...] | None = None) -> None:
    """Run the agent in the foreground with its logging, and exit with its status. SIGHUP calls `load` again."""
    from spool.agent import Agent, setup_logging

    config = load()
    setup_logging(config.log.level, config.log.format)
    raise click.exceptions.Exit(Agent(config, only=only, reload=load).run())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@common_options
@pass_context
def status(obj: Context, as_json: bool) -> None:
    """Show the backlog, dead letters, the endpoint, the last shipping attempt, and the health verdict.

    Exit 0 when healthy, 1 when degraded (spool copes: a failing link, records waiting long, dead letters), 2 when
    failing or misconfigured (an operator must act: a key, the endpoint, the spool itself).

    Example: spool status --json
    """
    import json

    from spool.health import EXIT_STATUS

    with obj.spool() as sp:
        report = sp.status()
    click.echo(json.dumps(report, sort_keys=True) if as_json else format_status(report))
    raise click.exceptions.Exit(EXIT_STATUS[report["health"]["verdict"]])


def format_status(report: dict[str, Any]) -> str:
    """Render a status report for people."""
    oldest = ""
    if report["oldest_pending_t"] is not None:
        oldest = f"   oldest {_when(report['oldest_pending_t'])} ({_age(report['oldest_pending_age'])} ago)"
    pid = report["shipper_pid"]
    shipper = "not running" if not pid else f"running (pid {pid})" if pid > 0 else "running"
    health = report["health"]
    problems = len(health["problems"])
    lines = [
        f"spool {report['path']} ({report['size_bytes'] / 1048576:.1f} MiB; {report['path_from']})",
        f"health       {health['verdict']}" + (f", {problems} problem{'s' * (problems > 1)} below" if problems else ""),
        f"config       {report['config']}",
        f"endpoint     {report['endpoint']}",
        f"  pending    {report['pending']:,}{oldest}",
        f"  in flight  {report['inflight']:,}",
        f"  sent       {report['sent']:,}   (kept for replay until pruned)",
        f"  dead       {report['dead']:,}",
        f"  held       {report['held']:,}   (stamped while the clock was wrong)",
        *([f"  staged     {report['staged']:,}   (an import under way: pending once it is whole)"]
          if report["staged"] else []),
        f"shipper      {shipper}",
    ]
    if report["last_attempt_at"] is not None:
        result = report["last_result"] + (f": {report['last_error']}" if report["last_error"] else "")
        lines.append(f"last attempt {_when(report['last_attempt_at'])}: {result}")
    if report["last_success_at"] is not None:
        lines.append(f"last success {_when(report['last_success_at'])}")
    pacing = report.get("pacing")
    if pacing and not pacing.get("ceiling"):
        lines.append(f"pacing       {pacing['why']}")
    elif pacing:
        lines.append(f"pacing       {pacing['rate']:.3g} req/s: {pacing['why']} (at most {pacing['ceiling']:g})")
    integrity = report.get("integrity")
    if integrity:
        lines.append(f"integrity    {_integrity(integrity)}")
    if report["counters"]:
        lines.append("counters     " + ", ".join(f"{k} {v:,}" for k, v in sorted(report["counters"].items())))
    lines += [f"problem: {problem}" for problem in report["problems"]]
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def _integrity(verdict: dict[str, Any]) -> str:
    """The last full integrity check, in a few words."""
    at = _when(verdict.get("at", 0))
    state = verdict.get("state")
    if state == "sound":
        return f"sound (full check {at}, {verdict.get('seconds', 0):g} s)"
    if state == "damaged":
        return f"DAMAGED (full check {at}): {verdict.get('detail')}"
    if state == "checking":
        return f"checking the whole file in the background (since {at})"
    return f"a full check is owed (the last agent did not stop cleanly; noted {at}): `spool run` runs it when idle"


def _when(t: float) -> str:
    """The one time format of every command's output."""
    return utc_text(t)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@cli.command()
@click.option("--deep", is_flag=True, help="Also run SQLite's full integrity check of the spool: it reads the whole "
              "file (minutes for a large backlog on an SD card). Damage it finds is recorded: the next start of "
              "`spool run` moves the file aside. And count every record, to compare with the kept counts.")
@click.option("--recount", is_flag=True, help="With --deep: set kept counts that differ to the real ones.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: {\"ok\": ..., \"checks\": [{\"name\", "
              "\"ok\", \"detail\", \"fix\"}, ...]}.")
@common_options
@pass_context
def doctor(obj: Context, deep: bool, recount: bool, as_json: bool) -> None:
    """Check the setup: config, key, endpoint, clock, disk, spool, watched directories, ports.

    Each check prints one line, with a fix when it fails; every check runs even if the config is broken.
    The spool is checked as opening it checks it (a few pages, whatever the backlog), with the verdict of
    the last full check; --deep runs the full check now. Exit 1 if any check failed. --json: the same, as
    one JSON document.

    Example: spool --config /etc/spool/spool.toml doctor --deep
    """
    from spool.api import check_setup

    if recount and not deep:
        raise click.UsageError("--recount needs --deep (it sets the counts --deep finds wrong)")
    verdicts = check_setup(obj.config_file, flags=obj.flags, deep=deep, recount=recount)
    failed = [v.name for v in verdicts if not v.ok]
    if as_json:
        import json

        click.echo(json.dumps({"ok": not failed, "checks": [verdict._asdict() for verdict in verdicts]},
                              indent=1, ensure_ascii=False))
    for verdict in verdicts if not as_json else ():
        mark = "ok  " if verdict.ok else "FAIL"
        fix = "" if verdict.ok or not verdict.fix else f" -- fix: {verdict.fix}"
        click.echo(f"{mark} {verdict.name}: {printable(verdict.detail)}{fix}")
    if failed:
        raise SpoolCommandError(f"{len(failed)} check{'s' if len(failed) != 1 else ''} failed: {', '.join(failed)}", 1)


@cli.group(cls=SpoolGroup)
def dead() -> None:
    """Inspect, requeue or purge records the receiver refused.

    Example: spool dead list
    """


@dead.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Show at most N.")
@common_options
@pass_context
def dead_list(obj: Context, as_json: bool, limit: int | None) -> None:
    """List dead records with the receiver's reason (keys are never shown).

    Example: spool dead list --limit 20
    """
    import json

    with obj.spool() as sp:
        letters = sp.dead_letters(limit)
    for letter in letters:
        record = letter.record
        shown = {"id": letter.id, "stat": record.stat if record.stat is not None else "(classic)",
                 "kind": ("count", "value")[record.kind], "number": record.number, "t": record.t,
                 "reason": letter.reason, "http_status": letter.http_status, "dead_at": letter.dead_at}
        if as_json:
            click.echo(json.dumps(shown, ensure_ascii=False))
        else:
            when = _when(letter.dead_at) if letter.dead_at is not None else "-"
            click.echo(f"{letter.id}\t{printable(str(shown['stat']))}\t{shown['kind']}={record.number}\t"
                       f"t={record.t}\t{when}\t{printable(letter.reason or '')}")
    if not letters and not as_json:
        click.echo("no dead records", err=True)


def _ids_or_all(ids: tuple[int, ...], everything: bool) -> list[int] | None:
    if everything == bool(ids):
        raise click.UsageError("give record IDs or --all (not both)")
    return None if everything else list(ids)


def _settled(verb: str, settled: Any) -> None:
    click.echo(f"{verb} {_n(settled.records, 'record')}", err=True)
    if settled.unknown_time:
        listed = ", ".join(map(str, settled.unknown_time[:20])) + (" ..." if len(settled.unknown_time) > 20 else "")
        raise SpoolCommandError(f"not requeued: {_n(len(settled.unknown_time), 'dead letter')} with no known time "
                                f"(stamped while the clock was wrong; a record is never shipped with a wrong t): "
                                f"{listed}; `spool dead purge` them, or leave them", 1)
    if settled.missing:
        listed = ", ".join(map(str, settled.missing[:20])) + (" ..." if len(settled.missing) > 20 else "")
        raise SpoolCommandError(f"not dead letters (no such id, or not dead): {listed}", 1)


@dead.command("requeue")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "everything", is_flag=True, help="Requeue every dead record.")
@common_options
@pass_context
def dead_requeue(obj: Context, ids: tuple[int, ...], everything: bool) -> None:
    """Return dead records to pending so they are sent again.

    Example: spool dead requeue --all
    """
    chosen = _ids_or_all(ids, everything)
    with obj.spool() as sp:
        settled = sp.requeue(chosen)
    _settled("requeued", settled)


@dead.command("purge")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "everything", is_flag=True, help="Delete every dead record.")
@common_options
@pass_context
def dead_purge(obj: Context, ids: tuple[int, ...], everything: bool) -> None:
    """Delete dead records for good.

    Example: spool dead purge 17 18
    """
    chosen = _ids_or_all(ids, everything)
    with obj.spool() as sp:
        settled = sp.purge(chosen)
    _settled("purged", settled)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (bash, zsh or fish): commands, options and settings.

    Load it from the shell's start-up file, e.g. `eval "$(spool completion bash)"` in ~/.bashrc, or save it
    where the shell looks (bash: /etc/bash_completion.d/spool; zsh: a file _spool in $fpath; fish:
    ~/.config/fish/completions/spool.fish).

    Example: spool completion bash > /etc/bash_completion.d/spool
    """
    from click.shell_completion import get_completion_class

    completer = get_completion_class(shell)
    assert completer is not None  # click knows the three shells the choice allows
    click.echo(completer(cli, {}, "spool", "_SPOOL_COMPLETE").source())
