"""The schema: its version, the tables, and the migration chain that brings any older spool to SCHEMA_VERSION."""

from __future__ import annotations

import sqlite3
from typing import Any

from spool.errors import StoreError
from spool.owners import legacy_alive
from spool.store.core import TALLIED, Core, State, _dumps

SCHEMA_VERSION = 11


def _create_schema(conn: sqlite3.Connection) -> None:
    """Create the version-1 schema with sqlite-utils (imported here only: the append path never needs it)."""
    import sqlite_utils

    db = sqlite_utils.Database(conn, execute_plugins=False)
    db.create_table(
        "records",
        {
            "id": int,
            "state": int,  # PENDING, SENT, DEAD (in flight = pending and named by a lease)
            "stat": str,  # EZ stat name; NULL for classic records
            "key": str,  # classic stat key
            "ukey": str,  # classic user key
            "ezkey": str,  # the record's own EZ key; NULL means the configured one
            "kind": int,  # 0 count, 1 value
            "number": "ANY",  # keeps ints as ints and floats as floats
            "t": int,  # unix seconds
            "done_at": float,  # when it became SENT or DEAD
            "reason": str,  # DEAD: the receiver's message
            "http_status": int,  # DEAD: the HTTP status of the refusal
            "body": str,  # DEAD: the response body, truncated
        },
        pk="id",
        not_null={"state", "kind", "number", "t"},
        defaults={"state": int(State.PENDING)},
        if_not_exists=True,
    )
    # Only pending records are indexed (by t, then id): that serves leasing oldest-first and the backlog's
    # count and age, while acks and prunes touch no index pages at all (a third fewer bytes written per
    # record; see scripts/bench.py). Everything else walks the primary key.
    conn.execute(f"CREATE INDEX IF NOT EXISTS pending_t ON records (t) WHERE state = {State.PENDING}")
    db.create_table("meta", {"name": str, "value": str}, pk="name", if_not_exists=True)


def _add_files_and_leases(conn: sqlite3.Connection) -> None:
    """Version 2: the identity of every ingested file (taken exactly once), and leases as rows of their own."""
    import sqlite_utils

    db = sqlite_utils.Database(conn, execute_plugins=False)
    db.create_table("files", {"digest": str, "name": str, "records": int, "at": float}, pk="digest",
                    if_not_exists=True)
    db.create_table("leases", {"id": int, "ids": str, "leased_at": float}, pk="id",
                    not_null={"ids", "leased_at"}, if_not_exists=True)


def _add_held(conn: sqlite3.Connection) -> None:
    """Version 3: records stamped while the clock was wrong keep their boot and its monotonic clock."""
    import sqlite_utils

    records = sqlite_utils.Database(conn, execute_plugins=False).table("records")
    records.add_column("held_boot", str)
    records.add_column("held_mono", float)


def _v4(conn: sqlite3.Connection) -> None:
    """Version 4: files by identity, leases with owners and never-reused ids, staged appends, suspects.

    * files: 0.1.0 knew files by a digest of their content, which dropped a second file with the same bytes.
      Those rows cannot be mapped to an identity; they only mattered for a file committed but not yet moved
      when 0.1.0 stopped, which is gone from its directory by now in all but that crash. They are dropped.
    * leases: ids under AUTOINCREMENT are never reused; `owner` names the process that holds the lease.
    * records.stage: the append a STAGED record belongs to (see `stages`). records.split: the suspect group
      of a record the receiver refused as part of a batch (the shipper isolates such records).
    * partial indexes of staged, suspect and held records: each holds only those, so it costs nothing when
      there are none.
    """
    conn.execute("DROP TABLE IF EXISTS files")
    conn.execute("CREATE TABLE files (path BLOB PRIMARY KEY, dev INTEGER NOT NULL, ino INTEGER NOT NULL, "
                 "offset INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, tail TEXT NOT NULL, "
                 "records INTEGER NOT NULL, at REAL NOT NULL)")
    conn.execute("CREATE TABLE leases_v4 (id INTEGER PRIMARY KEY AUTOINCREMENT, ids TEXT NOT NULL, "
                 "leased_at REAL NOT NULL, owner TEXT)")
    conn.execute("INSERT INTO leases_v4 (id, ids, leased_at) SELECT id, ids, leased_at FROM leases")
    conn.execute("DROP TABLE leases")
    conn.execute("ALTER TABLE leases_v4 RENAME TO leases")
    conn.execute("CREATE TABLE stages (id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, "
                 "started_at REAL NOT NULL)")
    conn.execute("ALTER TABLE records ADD COLUMN stage INTEGER")
    conn.execute("ALTER TABLE records ADD COLUMN split INTEGER")
    conn.execute(f"CREATE INDEX staged ON records (stage, t) WHERE state = {State.STAGED}")
    conn.execute(f"CREATE INDEX suspects ON records (split) WHERE state = {State.PENDING} AND split IS NOT NULL")
    # Every drain looks for held records to re-stamp: an index holding only those keeps that look free.
    conn.execute(f"CREATE INDEX held ON records (held_boot) WHERE state = {State.HELD}")


def _v5(conn: sqlite3.Connection) -> None:
    """Version 5: the records a lease holds are rows of `leased` (record id -> lease), not a JSON list in the lease.

    Leasing asks of every candidate whether some lease holds it: with lists, each lease parsed every live
    lease's list (its cost grew with the records in flight); a row per record is one lookup by id.
    """
    conn.execute("CREATE TABLE leased (id INTEGER PRIMARY KEY, lease INTEGER NOT NULL)")
    conn.execute("INSERT OR IGNORE INTO leased (id, lease) SELECT value, leases.id FROM leases, "
                 "json_each(leases.ids) ORDER BY leases.id")
    conn.execute("ALTER TABLE leases DROP COLUMN ids")
    # The span of record ids a lease holds: ending it deletes its rows of `leased` by a range, not a scan.
    conn.execute("ALTER TABLE leases ADD COLUMN first_id INTEGER")
    conn.execute("ALTER TABLE leases ADD COLUMN last_id INTEGER")
    conn.execute("UPDATE leases SET first_id = (SELECT min(id) FROM leased WHERE lease = leases.id), "
                 "last_id = (SELECT max(id) FROM leased WHERE lease = leases.id)")


def _v6(conn: sqlite3.Connection) -> None:
    """Version 6: an unfinished large append is hidden by the ids it spans, not by a state its records must leave.

    Version 5 committed a large append's chunks as STAGED records and made them PENDING in its last
    transaction: one UPDATE rewrote every record and moved every index entry, about doubling the append's work
    (and holding the write lock for that whole statement). Now the chunks are committed as the records they
    will be, and `stage_spans` names the ranges of ids each open stage holds; every reader of records leaves
    those out, and the last transaction deletes the stage's spans: no record is rewritten.

    The index of STAGED records goes (it cost every insert); the version-5 appends whose process died are
    discarded first, by it. One still running finishes as it began (its UPDATE finds its records without the
    index, more slowly); should it die, `sweep_stages` discards it by one scan: `meta` keeps the last stage id
    version 5 gave (ids are never reused), so only those stages are looked for as STAGED records.
    """
    for stage, owner in conn.execute("SELECT id, owner FROM stages").fetchall():
        if not legacy_alive(owner):
            conn.execute(f"DELETE FROM records WHERE state = {State.STAGED} AND stage = ?", (stage,))
            conn.execute("DELETE FROM stages WHERE id = ?", (stage,))
    last = conn.execute("SELECT max(id) FROM stages").fetchone()[0]
    if last is not None:
        conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (_V5_STAGES, _dumps(last)))
    conn.execute("DROP INDEX IF EXISTS staged")
    conn.execute("CREATE TABLE stage_spans (lo INTEGER PRIMARY KEY, hi INTEGER NOT NULL, stage INTEGER NOT NULL)")


_V5_STAGES = "version_5_stages_up_to"  # meta: stage ids up to this one staged their records as STAGED


def _v7(conn: sqlite3.Connection) -> None:
    """Version 7: stages and leases are owned by locks ("lock:TOKEN", see spool.owners), not by boot, pid and start.

    Nothing is rewritten: the owners version 6 named stay, judged as spool.owners says. The version is what
    changes, so that a release judging owners by pid refuses this spool instead of taking a running import's
    owner for dead (it cannot read a lock's name) and discarding its stage.
    """


def _settlements(conn: sqlite3.Connection) -> None:
    """Version 8: when records were settled is kept per acknowledged run of ids, and dead letters have an index, so
    housekeeping never walks the table for them.

    * settled (done_at, lo, hi): one row per run of consecutive ids an acknowledgement made SENT (a batch is
      mostly one run). Pruning takes the oldest rows first and deletes the sent records of their ranges, a
      step at a time; with nothing old enough it reads one row. A partial index of sent records by done_at
      did the same at an index entry per record: 86 more bytes written per shipped record (a fifth more),
      where a row per batch costs about 2. Sent records from before are entered by done_at, in runs of at
      most 1,000 ids.
    * dead (DEAD records, in id order): listing, requeueing and purging dead letters cost what there is of
      them; with none, nothing.
    """
    conn.execute("CREATE TABLE IF NOT EXISTS settled (done_at REAL NOT NULL, lo INTEGER NOT NULL, "
                 "hi INTEGER NOT NULL, PRIMARY KEY (done_at, lo)) WITHOUT ROWID")
    conn.execute(f"INSERT OR IGNORE INTO settled (done_at, lo, hi) SELECT done_at, min(id), max(id) FROM records "
                 f"WHERE state = {State.SENT} AND done_at IS NOT NULL GROUP BY done_at, id / 1000")
    conn.execute(f"CREATE INDEX IF NOT EXISTS dead ON records (state) WHERE state = {State.DEAD}")


def _kept_counts(conn: sqlite3.Connection) -> None:
    """Version 9: counts kept, not counted: `tally`, one row of how many records each state holds.

    Every statement that adds, removes or moves records changes the tally in its own transaction, by the rows it
    changed (its rowcount: no trigger, which would cost every record of a drain a statement); status, the bounds,
    /healthz and /metrics read it instead of counting the backlog. Here it is counted once, from the records, in
    the migrating transaction.
    """
    conn.execute("CREATE TABLE IF NOT EXISTS tally (pending INTEGER NOT NULL, held INTEGER NOT NULL, "
                 "sent INTEGER NOT NULL, dead INTEGER NOT NULL, staged INTEGER NOT NULL)")
    _set_tally(conn, _count_records_v9(conn))


def _ledger(conn: sqlite3.Connection) -> None:
    """Version 10: the ledger. Records are written once, small, and never rewritten when shipped.

    * series: what a record's stat is (stat, key, ukey, ezkey, kind), interned: records carry its integer.
    * records (id, state, series, number, t): 20-odd bytes a row. Ids are never reused (AUTOINCREMENT), so a
      range of ids names the same records for ever. `state` is LIVE (pending, in flight or sent: the ledger
      says which), DEAD or HELD; shipping never rewrites a record.
    * queue (t, id): the pending records no lease or suspect group holds, in the order they are shipped
      (oldest t first). A lease takes its records out of the queue; a lease that ends unsettled puts them back.
    * leases and lease_runs: a lease is one row, and the records it holds are runs of consecutive ids
      (a batch of a backlog appended in time order is one run). An acknowledgement ends the lease and writes
      one row of `settled` per run: what makes a record SENT is being LIVE and in none of queue, leases,
      suspects.
    * suspects (id, grp): records refused together, split apart to find which the receiver refuses.
    * dead (id, done_at, reason, http_status, body), held (id, boot, mono): the few records that need more
      than the five columns.

    Every record is copied once into the new table (the file briefly holds both); sent records' runs of
    `settled` are recomputed exactly from their ids. Leases of an earlier release end here: their records are
    pending again (an earlier release's shipper cannot go on with this schema).
    """
    from spool.owners import legacy_alive as _alive

    for stage, owner in conn.execute("SELECT id, owner FROM stages").fetchall():
        if conn.execute(f"SELECT 1 FROM records WHERE state = {State.STAGED} AND stage = ? LIMIT 1",
                        (stage,)).fetchone() is None:
            continue
        if _alive(owner):
            raise StoreError("an import by an earlier release of spool is still running on this spool; upgrade "
                             "once it has finished")
        conn.execute(f"DELETE FROM records WHERE state = {State.STAGED} AND stage = ?", (stage,))
        conn.execute("DELETE FROM stages WHERE id = ?", (stage,))
    conn.execute(f"DELETE FROM records WHERE state = {State.STAGED}")  # none is left but a dead owner's
    for index in ("pending_t", "suspects", "held", "dead"):  # their names are the new tables'
        conn.execute(f"DROP INDEX IF EXISTS {index}")
    conn.execute("CREATE TABLE series (id INTEGER PRIMARY KEY AUTOINCREMENT, stat TEXT, key TEXT, ukey TEXT, "
                 "ezkey TEXT, kind INTEGER NOT NULL, refs INTEGER NOT NULL DEFAULT 0)")
    conn.execute("CREATE INDEX series_of ON series (stat, key)")
    conn.execute("INSERT INTO series (stat, key, ukey, ezkey, kind, refs) "
                 "SELECT stat, key, ukey, ezkey, kind, count(*) FROM records GROUP BY stat, key, ukey, ezkey, kind")
    conn.execute("CREATE TABLE records_v10 (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                 f"state INTEGER NOT NULL DEFAULT {State.PENDING}, series INTEGER NOT NULL, number ANY NOT NULL, "
                 "t INTEGER NOT NULL)")
    conn.execute("CREATE TEMP TABLE series_key AS SELECT id, stat, key, ukey, ezkey, kind FROM series")
    conn.execute("CREATE INDEX temp.series_key_all ON series_key (stat, key, ukey, ezkey, kind)")
    conn.execute(f"INSERT INTO records_v10 (id, state, series, number, t) "
                 f"SELECT r.id, CASE r.state WHEN {State.SENT} THEN {State.PENDING} ELSE r.state END, s.id, r.number, "
                 f"r.t FROM records r JOIN series_key s ON s.stat IS r.stat AND s.key IS r.key AND s.ukey IS r.ukey "
                 f"AND s.ezkey IS r.ezkey AND s.kind = r.kind ORDER BY r.id")
    conn.execute("DROP TABLE temp.series_key")
    conn.execute("CREATE TABLE queue (t INTEGER NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (t, id)) WITHOUT ROWID")
    conn.execute(f"INSERT INTO queue (t, id) SELECT t, id FROM records WHERE state = {State.PENDING} "
                 "AND split IS NULL ORDER BY t, id")
    conn.execute("CREATE TABLE suspects (id INTEGER PRIMARY KEY, grp INTEGER NOT NULL)")
    conn.execute("CREATE INDEX suspects_grp ON suspects (grp)")
    conn.execute(f"INSERT INTO suspects (id, grp) SELECT id, split FROM records WHERE state = {State.PENDING} "
                 "AND split IS NOT NULL")
    conn.execute("CREATE TABLE held (id INTEGER PRIMARY KEY, boot TEXT, mono REAL)")
    conn.execute(f"INSERT INTO held (id, boot, mono) SELECT id, held_boot, held_mono FROM records "
                 f"WHERE state = {State.HELD}")
    conn.execute("CREATE TABLE dead (id INTEGER PRIMARY KEY, done_at REAL, reason TEXT, http_status INTEGER, "
                 "body TEXT)")
    conn.execute(f"INSERT INTO dead (id, done_at, reason, http_status, body) SELECT id, done_at, reason, "
                 f"http_status, body FROM records WHERE state = {State.DEAD}")
    # The runs of sent records, exactly: consecutive ids settled at the same time.
    conn.execute("DELETE FROM settled")
    conn.execute(f"INSERT INTO settled (done_at, lo, hi) SELECT done_at, min(id), max(id) FROM (SELECT id, "
                 f"coalesce(done_at, 0) AS done_at, id - row_number() OVER (PARTITION BY coalesce(done_at, 0) "
                 f"ORDER BY id) AS run FROM records WHERE state = {State.SENT}) GROUP BY done_at, run")
    conn.execute("CREATE INDEX settled_lo ON settled (lo)")
    newest = conn.execute("SELECT max(id) FROM records").fetchone()[0]
    conn.execute("DROP TABLE records")
    conn.execute("ALTER TABLE records_v10 RENAME TO records")
    if newest is not None:
        conn.execute("DELETE FROM sqlite_sequence WHERE name = 'records'")
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)", (newest,))
    conn.execute("DROP TABLE leased")
    conn.execute("DROP TABLE leases")
    conn.execute("CREATE TABLE leases (id INTEGER PRIMARY KEY AUTOINCREMENT, leased_at REAL NOT NULL, owner TEXT)")
    conn.execute("CREATE TABLE lease_runs (lo INTEGER PRIMARY KEY, hi INTEGER NOT NULL, lease INTEGER NOT NULL)")
    # The fields of every record by name, for whoever reads the file with sqlite3 (and the tests).
    conn.execute("CREATE VIEW record_view AS SELECT r.id, r.state, s.stat, s.key, s.ukey, s.ezkey, s.kind, r.number, "
                 "r.t FROM records r CROSS JOIN series s ON s.id = r.series")
    conn.execute("DELETE FROM meta WHERE name = 'compaction'")  # a cursor over the old index
    _set_tally(conn, _count_records(conn, queued=_QUEUED_V10))


def _queue_runs(conn: sqlite3.Connection) -> None:
    """Version 11: the queue as runs of ids (`queue_runs`), shipped in append order, instead of an entry per record
    ordered by t (a lease deleted 500 entries: about 11 pages written per batch, and the entries were 40 % of a
    pending record's bytes). Consecutive queued ids become one run; ids between them that no record has any more
    do not split a run (nothing is queued there)."""
    conn.execute("CREATE TABLE queue_runs (lo INTEGER PRIMARY KEY, hi INTEGER NOT NULL)")
    # Runs of queued ids, broken only by a record that is not queued: number every record, and the queued ones,
    # in id order; along a run both numbers grow together (their difference names the run).
    conn.execute("CREATE TEMP TABLE queued_v11 (id INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO temp.queued_v11 (id) SELECT id FROM queue")
    conn.execute("INSERT INTO queue_runs (lo, hi) SELECT min(id), max(id) FROM (SELECT id, n - row_number() OVER "
                 "(ORDER BY id) AS run FROM (SELECT r.id, q.id IS NOT NULL AS queued, row_number() OVER "
                 "(ORDER BY r.id) AS n FROM records r LEFT JOIN temp.queued_v11 q ON q.id = r.id) WHERE queued) "
                 "GROUP BY run")
    conn.execute("DROP TABLE temp.queued_v11")
    conn.execute("DROP TABLE queue")
    conn.execute("DELETE FROM meta WHERE name = 'compaction'")  # a cursor over the old order


_MIGRATIONS = {1: _create_schema, 2: _add_files_and_leases, 3: _add_held, 4: _v4, 5: _v5, 6: _v6,
               7: _v7, 8: _settlements, 9: _kept_counts, 10: _ledger, 11: _queue_runs}  # version -> step

_TALLY_STATES = {State.PENDING: "pending", State.HELD: "held", State.SENT: "sent", State.DEAD: "dead",
                 State.STAGED: "staged"}


def _count_records_v9(conn: sqlite3.Connection) -> dict[str, int]:
    """Count the records of each state as versions 4 to 9 stored them (a state per record).

    In flight is pending. Staged: records an open stage's spans name (whatever their state), and version 5's
    STAGED records.
    """
    spans = conn.execute("SELECT lo, hi FROM stage_spans").fetchall()
    outside = "".join(f" AND NOT (id BETWEEN {int(lo)} AND {int(hi)})" for lo, hi in spans)
    # One pass, summing as it goes (GROUP BY state would sort every record first).
    sums = ", ".join(f"coalesce(sum(state = {int(state)}), 0)" for state in _TALLY_STATES)
    counts = dict.fromkeys(TALLIED, 0)
    for state, n in zip(_TALLY_STATES, conn.execute(f"SELECT {sums} FROM records WHERE 1{outside}").fetchone(),
                        strict=True):
        counts[_TALLY_STATES[state]] += n
    for lo, hi in spans:
        counts["staged"] += conn.execute("SELECT count(*) FROM records WHERE id BETWEEN ? AND ?",
                                         (lo, hi)).fetchone()[0]
    return counts


# Queued records, as version 10 kept them (an entry per record) and as version 11 does (runs of ids).
_QUEUED_V10 = "queue q CROSS JOIN records ON records.id = q.id"
_QUEUED_V11 = "queue_runs q CROSS JOIN records ON records.id BETWEEN q.lo AND q.hi"


def _count_records(conn: sqlite3.Connection, *, queued: str = _QUEUED_V11) -> dict[str, int]:
    """Count the records of each state, reading every one (the tally says the same at once).

    Staged: the records of open stages' spans. Of the others, held and dead records are stored so; pending ones
    (in flight included) are those of the queue, the suspect groups and the live leases' runs; every other live
    record is sent.
    """
    spans = conn.execute("SELECT lo, hi FROM stage_spans").fetchall()
    outside = "".join(f" AND NOT (id BETWEEN {int(lo)} AND {int(hi)})" for lo, hi in spans)
    counts = dict.fromkeys(TALLIED, 0)
    live, counts["held"], counts["dead"] = conn.execute(
        f"SELECT coalesce(sum(state = {State.PENDING}), 0), coalesce(sum(state = {State.HELD}), 0), "
        f"coalesce(sum(state = {State.DEAD}), 0) FROM records WHERE 1{outside}").fetchone()
    queued = conn.execute(f"SELECT count(*) FROM {queued} WHERE records.state = {State.PENDING}"
                          f"{outside.replace('(id', '(records.id')}").fetchone()[0]
    suspect = conn.execute(f"SELECT count(*) FROM suspects CROSS JOIN records USING (id) "
                           f"WHERE records.state = {State.PENDING}{outside.replace('(id', '(suspects.id')}"
                           ).fetchone()[0]
    leased = conn.execute(f"SELECT count(*) FROM lease_runs CROSS JOIN records ON records.id BETWEEN lo AND hi "
                          f"WHERE records.state = {State.PENDING}{outside.replace('(id', '(records.id')}").fetchone()[0]
    counts["pending"] = queued + suspect + leased
    counts["sent"] = live - counts["pending"]
    for lo, hi in spans:
        counts["staged"] += conn.execute("SELECT count(*) FROM records WHERE id BETWEEN ? AND ?",
                                         (lo, hi)).fetchone()[0]
    return counts


def _set_tally(conn: sqlite3.Connection, counts: dict[str, int]) -> None:
    conn.execute("DELETE FROM tally")
    conn.execute(f"INSERT INTO tally ({', '.join(TALLIED)}) VALUES ({', '.join('?' * len(TALLIED))})",
                 [counts[name] for name in TALLIED])


def _chain() -> Any:
    """The migration chain as sqlite-utils' migration set: a step per version, named by it ("schema_11")."""
    import sqlite_utils

    chain = sqlite_utils.Migrations("spool")
    for version, step in sorted(_MIGRATIONS.items()):
        def run(db: Any, step: Any = step) -> None:
            step(db.conn)

        chain(name=_step_name(version))(run)
    return chain


def _step_name(version: int) -> str:
    return f"schema_{version:02d}"


class Schema(Core):
    """Bringing an open spool's schema to this release's version, once, whoever opens it first."""

    def _migrate(self) -> None:
        """Apply the steps a spool lacks, with sqlite-utils' migrations, all in one immediate transaction.

        sqlite-utils records each step applied (`_sqlite_migrations`) and runs it in a savepoint of its own with
        that record; the transaction around them all, taken before the version is read again, makes the whole
        chain one commit (a power cut or an error leaves the spool as it was) and keeps a second process opening
        the same old spool from migrating it twice. A spool of an earlier release knew its version only by
        `user_version`: the steps up to it are recorded as applied first. `user_version` is kept too, for the
        check that refuses a spool newer than this release.
        """
        if self._schema_version() == SCHEMA_VERSION:
            return
        self.conn.execute("BEGIN IMMEDIATE")  # re-read inside the lock: another process may have migrated
        try:
            version = self._schema_version()
            if version < SCHEMA_VERSION:
                import datetime

                import sqlite_utils

                db = sqlite_utils.Database(self.conn, execute_plugins=False)
                chain = _chain()
                chain.ensure_migrations_table(db)
                if version and not chain.applied(db):
                    now = str(datetime.datetime.now(datetime.timezone.utc))
                    db[chain.migrations_table].insert_all(  # type: ignore[union-attr]
                        [{"migration_set": chain.name, "name": _step_name(done), "applied_at": now}
                         for done in range(1, version + 1)])
                chain.apply(db)
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def _schema_version(self) -> int:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"spool {self.path} has schema version {version}, newer than this spool "
                             f"understands ({SCHEMA_VERSION}); upgrade spool")
        return version
