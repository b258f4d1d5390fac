"""The spool file: schema, and every SQL statement spool runs. The only package that touches sqlite3.

Its rooms, one mixin class each, composed into `Store` below:

* core.py: what every room shares: `State`, the SQL vocabulary, transactions (`_read`, `_write`), the
  condition hiding open stages (`_hidden`), the kept counts (`_tally`), counters and meta, and SQLite's errors
  translated for operators.
* schema.py: SCHEMA_VERSION, the tables and the migration chain (version 1 to 11).
* connection.py: opening a spool file (creating it private, pragmas, quarantining a corrupt one), closing.
* appends.py: the producers' side: append (staged when large), stages and their sweep, the bounds.
* files.py: the marks of dropped files (`FileMark`), committed with their records.
* queue.py: the queue of pending records as runs of ids, and the walks of it (bounded by ids).
* ledger.py: the shipper's side: leases (batches built by SQLite where exact), acks, suspects (splits), dead
  marking, releasing dead leases.
* queries.py: the operator's side: counts and status, dead letters, export/move/replay, re-stamping held
  records; and housekeeping's long jobs, each a series of small transactions: pruning, compaction, giving
  free pages back.

The storage contract, stated once:

* A record is in exactly one state: PENDING (queued, or suspect), INFLIGHT (held by a live lease's runs), SENT,
  DEAD or HELD (stamped while the clock was wrong).
* `append` returns only after its transaction committed; with synchronous=FULL (the default) that
  survives power loss, with NORMAL it survives a crash of the process but maybe not of the machine.
* A large append is staged: written in chunks, each committed as the records it will be (PENDING, or HELD)
  with their ids named in the spans of its open stage (`stage_spans`). Every reader of records leaves the ids
  of open stages out (leases, counts, status, export, the bounds, age drops, compaction, re-stamping), so
  none of it is visible. Its last transaction deletes the stage's spans (with the file mark and the bounds):
  the whole append appears at once, without rewriting a record. All or nothing, and no transaction holds the
  write lock for long (a chunk, or that publish). Staged records of an owner that died are discarded
  (`sweep_stages`), a chunk per transaction, the span shrinking with them so what is left stays hidden. An
  append whose stage is no longer whole when it publishes (or before a chunk) fails and publishes nothing.
* The ledger (schemas 10 and 11) keeps its books per batch. A record is written once: (id, state, series,
  number, t), its series (stat, key, ukey, ezkey, kind) interned in `series`. Pending records wait in the
  queue, runs of their ids (`queue_runs`, see queue.py); `lease` takes the first of them (append order) out
  of the queue inside one immediate
  transaction (the write lock is held from its start, so no other shipper can lease between the query and
  the delete): two shippers can never lease the same record. A lease is one row naming its owner (a lock its
  Store holds: `spool.owners`) and the runs of consecutive ids it holds (`lease_runs`; a batch of a backlog
  appended in time order is one run). Record and lease ids are never reused (AUTOINCREMENT), so a run names
  the same records for ever. A lease is committed without waiting for the disk: one lost in a power cut
  leaves its records in the queue, as its owner's death would, and the next durable commit (an
  acknowledgement) makes it durable anyway.
* `ack` marks records SENT without writing them: they leave their lease's runs, and one row of `settled`
  (done_at, lo, hi) per run says when. A live record that is in no queue, lease or suspect group is sent.
  It is called only after the receiver acknowledged them. `mark_dead` moves records to DEAD with the
  receiver's reason, HTTP status and body (a row of `dead`). `end_lease` drops the lease: the live records its
  runs still hold go back to the queue (transient failure, shutdown). `release` gives some of a lease's
  records back unsent (the shipper holds them back: their configured key was refused), `split` makes them
  suspect groups (`suspects`), and `expire` deletes some that passed max_age while leased (`dropped_age`).
* A stage or a lease is taken from its owner only when the owner is proven dead (`sweep_stages`,
  `release_dead_leases`): its lock, which the kernel drops when the owner's process ends, could be taken.
  No pid is compared: pids name nothing across PID namespaces, containers and emulators. A live owner's
  stage or lease is never taken from it.
* A dropped file's identity (path, device, inode, the offset read up to, mtime, a hash of the bytes just
  before that offset) is committed with its records; see `FileMark`.
* SENT records are kept for the retention period (for replay) and then pruned by their rows of `settled`,
  oldest first, in small transactions. Each series counts its records (`refs`) and is forgotten with its last
  one; a writer's memory of series ids is dropped when `series_epoch` in meta says one was forgotten.
* No job holds the write lock for long: compaction and pruning read and change at most about a thousand
  records per transaction, and giving free pages back moves at most RELEASE_STEP pages; each resumes where it
  stopped (compaction's cursor is kept in meta).
* Counts are kept, not counted: `tally` (one row: pending, held, sent, dead, staged) is changed in the
  transaction of every statement that adds, removes or moves records, by the rows that statement changed (its
  rowcount). Pending includes records in flight; staged are the records of open stages, pending (or held) only
  once published. Status, the bounds, /healthz and /metrics read the tally and count only the records the live
  leases name (in flight); `doctor --deep` compares the tally with a real count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spool.store.appends import STAGE_CHUNK, SWEEP_CHUNK, Appends
from spool.store.connection import PAGE_SIZE, Opening
from spool.store.core import BUSY_TIMEOUT, State, sqlite_library
from spool.store.files import FileMark, FileMarks
from spool.store.ledger import ACK_RUN, MAX_BODY, Lease, Leased, Ledger
from spool.store.queries import COUNTED, RESTAMP_SLACK, Queries
from spool.store.schema import SCHEMA_VERSION, _create_schema

if TYPE_CHECKING:
    from spool.config import Config

__all__ = ["ACK_RUN", "BUSY_TIMEOUT", "COUNTED", "MAX_BODY", "PAGE_SIZE", "RESTAMP_SLACK", "SCHEMA_VERSION",
           "STAGE_CHUNK", "SWEEP_CHUNK", "FileMark", "Lease", "Leased", "State", "Store", "_create_schema",
           "sqlite_library"]


class Store(Opening, Appends, FileMarks, Ledger, Queries):
    """An open spool file. One connection; use one Store per thread."""

    @classmethod
    def for_config(cls, config: Config, *, quarantine: bool = False, create: bool = True) -> Store:
        """Open the spool a Config names, with its synchronous mode and limits."""
        return cls(config.db, synchronous=config.spool.synchronous, limits=config.spool, quarantine=quarantine,
                   create=create)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
