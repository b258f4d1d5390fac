"""The `spool` command's entry: the console script, `python -m spool` and the zipapp all call main()."""

from __future__ import annotations


def main() -> None:
    """Import the CLI with the cyclic garbage collector paused, then run it.

    What importing the CLI creates (modules, classes, click's command tree: some 20,000 objects) lives as long
    as the process. Left running, the collector walks those objects again and again while they are being made
    and finds almost nothing to free: that was about a tenth of a `spool add` process. So it waits, the objects
    are then moved out of its sight for good (gc.freeze), and it runs as usual for everything made afterwards,
    the long-running agent's objects included.
    """
    import gc

    gc.disable()
    try:
        from spool.cli import main as cli
    finally:
        gc.freeze()
        gc.enable()
    cli()


if __name__ == "__main__":
    main()
