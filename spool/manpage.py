"""The man page, spool(1), made from the click commands themselves: `python -m spool.manpage > spool.1`.

scripts/build puts it in the .deb (/usr/share/man/man1/spool.1.gz), so `man spool` says what `spool --help` and
each command's --help say, and cannot drift from them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import click

FILES = [
    ("/etc/spool/spool.toml", "the configuration (or --config FILE, or $SPOOL_CONFIG); every setting, with its "
     "default: python -m spool.config toml"),
    ("/etc/spool/ezkey", "the EZ key on a packaged box (ship.ezkey_file), mode 600"),
    ("/var/lib/spool/spool.db", "the spool on a packaged box; elsewhere $XDG_STATE_HOME/spool/spool.db "
     "(~/.local/state/spool/spool.db)"),
]
ENVIRONMENT = [
    ("SPOOL_CONFIG", "the configuration file"),
    ("SPOOL_DB", "the spool file (spool.path)"),
    ("SPOOL_EZKEY_FILE", "a file holding the EZ key (ship.ezkey_file)"),
    ("SPOOL_<SECTION>_<KEY>", "any setting, e.g. SPOOL_SHIP_BATCH_SIZE=100"),
]
EXIT_STATUS = [
    ("0", "success"),
    ("1", "a runtime failure: the spool missing or unreadable, the disk full, records left after --max-time, "
     "another shipper already running, a check of doctor failed"),
    ("2", "a usage, validation or configuration error"),
    ("141", "the output was closed early (| head)"),
]


def escape(text: str) -> str:
    """Text as roff reads it literally: backslashes and hyphens escaped, non-ASCII as named Unicode characters."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "".join(c if c.isascii() else f"\\[u{ord(c):04X}]" for c in text)


def lines(text: str) -> Iterator[str]:
    """Paragraphs of help text as roff: one input line per paragraph, .PP between; none starts a request."""
    for i, paragraph in enumerate(p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()):
        if i:
            yield ".PP"
        yield "\\&" + escape(" ".join(paragraph.split()))


def _options(command: click.Command, ctx: click.Context) -> Iterator[str]:
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        yield ".TP"
        yield "\\fB" + escape(names) + "\\fR"
        yield "\\&" + escape(" ".join(help_text.split())) if help_text else "\\&"


def _commands(group: click.Group, ctx: click.Context, prefix: str) -> Iterator[str]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub = click.Context(command, info_name=name, parent=ctx)
        if isinstance(command, click.Group):
            yield from _commands(command, sub, f"{prefix} {name}")
            continue
        usage = " ".join(command.collect_usage_pieces(sub))
        yield f'.SS "{escape(prefix)} {escape(name)} {escape(usage)}"'
        yield from lines(command.help or "")
        yield from _options(command, sub)


def render(group: click.Group, version: str) -> str:
    """The whole page, in roff (man macros)."""
    ctx = click.Context(group, info_name="spool")
    summary = (group.help or "").strip().split("\n")[0].rstrip(".")
    out = [f'.TH SPOOL 1 "" "spool {escape(version)}" "User Commands"', ".SH NAME",
           f"spool \\- {escape(summary[0].lower() + summary[1:])}", ".SH SYNOPSIS",
           ".B spool", "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...", ".SH DESCRIPTION",
           *lines(group.help or ""), ".SH OPTIONS",
           "\\&Options every command takes, before or after its name:", *_options(group, ctx),
           ".SH COMMANDS", *_commands(group, ctx, "spool")]
    for title, entries in (("FILES", FILES), ("ENVIRONMENT", ENVIRONMENT), ("EXIT STATUS", EXIT_STATUS)):
        out.append(f".SH {title}")
        for term, meaning in entries:
            out += [".TP", f"\\fB{escape(term)}\\fR", "\\&" + escape(meaning)]
    out += [".SH SEE ALSO", "\\&The README (/usr/share/doc/stathat\\-spool/README.md on a packaged box): the "
            "configuration reference, how shipping works, delivery guarantees and troubleshooting."]
    return "\n".join(out) + "\n"


def main() -> None:
    from importlib.metadata import PackageNotFoundError, version

    from spool.cli import cli

    try:
        release = version("stathat-spool")
    except PackageNotFoundError:  # the sources alone (scripts/build runs this from its staging tree)
        release = "unknown"
    sys.stdout.write(render(cli, release))


if __name__ == "__main__":
    main()
