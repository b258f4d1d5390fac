"""The queue: the pending records no lease or suspect group holds, kept as runs of ids (schema 11).

Records are shipped in the order they were appended (their ids), as every durable buffer does; a run
`(lo, hi)` of `queue_runs` says that every live record with an id from lo to hi is queued. An append extends
the last run (one row changes, whatever the backlog), a lease takes the front of the first runs (one or two
row changes for a whole batch), and records given back, requeued or re-stamped return as runs of their own
ids, at the front, since ids are never reused. A run may span ids whose records are gone (deleted by a drop,
compaction, an export --remove, a discarded stage): nothing is queued there, and the next lease that walks
past them takes them out of the run. A run never spans a live record that is not queued (held, dead, leased,
suspect, sent).

Schema 10 kept one queue entry per record, ordered by t: a lease deleted 500 of them (about 11 pages written
for each batch of 500, with 1 KiB pages) and they were 40 % of a pending record's bytes on disk.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from spool.records import INT64_MAX
from spool.store.core import State

Run = tuple[int, int]

# Whether the live record `r` is queued: the run starting at or before its id reaches it (one seek).
QUEUED = "coalesce((SELECT q.hi FROM queue_runs q WHERE q.lo <= r.id ORDER BY q.lo DESC LIMIT 1) >= r.id, 0)"
# The queued records, `r`, run by run in append order (the join walks the primary key by range). Only to read
# from the front of the queue: a condition on r.id would not bound the walk of each run (SQLite takes one lower
# bound of the two); from an id on, read QUEUED_FROM (its ids from ? on) with QUEUE_FROM.
QUEUED_RECORDS = "queue_runs q CROSS JOIN records r ON r.id BETWEEN q.lo AND q.hi"
QUEUED_FROM = "queue_runs q CROSS JOIN records r ON r.id BETWEEN max(q.lo, ?) AND q.hi"
# The first run worth looking at for ids from ? on: the one that starts at or before it (else the first).
QUEUE_FROM = "q.lo >= coalesce((SELECT max(lo) FROM queue_runs WHERE lo <= ?), 0)"


def queued_between(lo: int, hi: int, join: str = "") -> str:
    """FROM and WHERE (the queue's runs joined to the records `r`, and `join`) for the queued ids from lo to hi:
    each run is walked from lo or its start, to hi or its end. Literal ints: a statement prepared each time (tens
    of microseconds), for the lease's less common steps (keyless records skipped, records past max_age)."""
    return (f"queue_runs q CROSS JOIN records r ON r.id BETWEEN max(q.lo, {int(lo)}) AND min(q.hi, {int(hi)}) {join} "
            f"WHERE q.lo >= coalesce((SELECT max(lo) FROM queue_runs WHERE lo <= {int(lo)}), 0) AND q.lo <= {int(hi)}")


def enqueue_new(conn: sqlite3.Connection, lo: int, hi: int, held: Sequence[int] = ()) -> None:
    """Queue the records just appended with ids lo..hi (but those in `held`): the last run grows when it ends
    just before lo (the common case: one row rewritten), else a new run starts."""
    runs = subtract((lo, hi), runs_of(held)) if held else [(lo, hi)]
    if not runs:
        return
    first, *rest = runs
    if not conn.execute("UPDATE queue_runs SET hi = ? WHERE lo = (SELECT max(lo) FROM queue_runs) AND hi = ?",
                        (first[1], first[0] - 1)).rowcount:
        rest.insert(0, first)
    conn.executemany("INSERT INTO queue_runs (lo, hi) VALUES (?, ?)", rest)


def enqueue(conn: sqlite3.Connection, runs: Iterable[Run]) -> None:
    """Queue (again) the records of runs of ids that are in no run now: records given back from a lease or a
    suspect group, requeued dead letters, re-stamped held records. They take their place by their ids: ahead of
    everything appended after them."""
    conn.executemany("INSERT INTO queue_runs (lo, hi) VALUES (?, ?)", list(runs))


def dequeue(conn: sqlite3.Connection, runs: Sequence[Run], found: Sequence[Run] | None = None) -> None:
    """Take sorted, disjoint runs of ids out of the queue's runs (ids there no run covers are left alone).
    `found`: the queue's runs that overlap them, if the caller has just read them."""
    if not runs:
        return
    if found is None:
        found = conn.execute(f"SELECT lo, hi FROM queue_runs q WHERE {QUEUE_FROM} AND q.lo <= ? ORDER BY q.lo",
                             (runs[0][0], runs[-1][1])).fetchall()
    for run in found:
        cuts = intersect([run], list(runs))
        if not cuts:
            continue
        left = subtract(run, cuts)
        if len(left) == 1 and left[0][1] == run[1]:  # the front taken (a lease): the run now starts later
            conn.execute("UPDATE queue_runs SET lo = ? WHERE lo = ?", (left[0][0], run[0]))
        elif len(left) == 1 and left[0][0] == run[0]:  # the end taken
            conn.execute("UPDATE queue_runs SET hi = ? WHERE lo = ?", (left[0][1], run[0]))
        else:
            conn.execute("DELETE FROM queue_runs WHERE lo = ?", (run[0],))
            conn.executemany("INSERT INTO queue_runs (lo, hi) VALUES (?, ?)", left)


def queued_ids(conn: sqlite3.Connection, runs: Sequence[Run]) -> list[int]:
    """Return the ids of the queued live records among sorted runs of ids."""
    if not runs:
        return []
    return [record_id for (record_id,) in conn.execute(
        f"SELECT r.id FROM {queued_between(runs[0][0], runs[-1][1])} AND r.state = {State.PENDING} "
        f"AND {_between(runs, 'r.id')} ORDER BY r.id")]


def front(conn: sqlite3.Connection, after: int, columns: str, join: str, where: str, limit: int,
          params: Sequence[object] = (), spans: Sequence[Run] = ()) -> list[Any]:
    """Return up to `limit` rows of the queued live records with ids above `after`, in append order:
    `SELECT r.id, {columns} FROM` the queue's runs joined to the records `r` (and `join`), `where` (conditions
    starting with AND, with `params`) leaving some out. The ids of `spans` (open stages) are skipped, not walked:
    each stretch between them is read on its own."""
    rows: list[Any] = []
    for lo, hi in _between_spans(after + 1, spans):
        rows += conn.execute(f"SELECT r.id, {columns} FROM queue_runs q CROSS JOIN records r ON r.id BETWEEN "
                             f"max(q.lo, ?) AND min(q.hi, ?) {join} WHERE {QUEUE_FROM} AND q.lo <= ? "
                             f"AND r.state = {State.PENDING}{where} ORDER BY q.lo, r.id LIMIT ?",
                             (lo, hi, lo, hi, *params, limit - len(rows))).fetchall()
        if len(rows) >= limit:
            break
    return rows


def _between_spans(start: int, spans: Sequence[Run]) -> list[Run]:
    """The stretches of ids from `start` on that no span covers."""
    return subtract((start, INT64_MAX), sorted((int(lo), int(hi)) for lo, hi in spans))


def _between(runs: Sequence[Run], column: str) -> str:
    return "(" + " OR ".join(f"{column} BETWEEN {int(lo)} AND {int(hi)}" for lo, hi in runs) + ")"


def intersect(a: list[Run], b: list[Run]) -> list[Run]:
    """The runs both sorted lists of runs cover."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(run: Run, cuts: list[Run]) -> list[Run]:
    """What is left of a run once sorted, disjoint runs are taken out of it."""
    out, lo = [], run[0]
    for a, b in cuts:
        if b < lo or a > run[1]:
            continue
        if a > lo:
            out.append((lo, a - 1))
        lo = max(lo, b + 1)
    if lo <= run[1]:
        out.append((lo, run[1]))
    return out


def runs_of(ids: Iterable[int]) -> list[Run]:
    """Return the ids as sorted runs of consecutive integers, (first, last) each."""
    runs: list[Run] = []
    ordered = sorted(ids)
    if not ordered:
        return runs
    if ordered[-1] - ordered[0] + 1 == len(ordered):  # one run, without a Python step per id (a whole batch)
        return [(ordered[0], ordered[-1])]
    first = last = ordered[0]
    for i in ordered:
        if i > last + 1:
            runs.append((first, last))
            first = i
        last = i
    runs.append((first, last))
    return runs
