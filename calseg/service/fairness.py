"""Fair turns between users: a worker runs the fairest queued job, not the oldest message.

The database stays the source of truth and every queued job still has its own broker message
(:func:`calseg.service.jobs.submit_job`), so the reconciler (:mod:`calseg.service.reconcile`)
and redelivery work as before. What changes is what a message means: a message carries a
*dispatch token* (``jobs.dispatch_id``), one per queued job, and a worker that receives a token
runs the fairest eligible job of that queue (:func:`take_turn`), not necessarily the job the
message was first sent for. The two jobs swap tokens in one conditional transaction: the chosen
job takes the token in hand, the job that held it takes the chosen job's token (whose message
is still on the broker). Every queued job therefore keeps exactly one token whose message is on
the broker, and the reconciler matches queued jobs to broker messages by token alone.

Fairness (:func:`fair_order`): among queued jobs of the message's queue (``cpu`` or ``gpu``),

1. the owner with the fewest running jobs goes first (any queue);
2. then the owner whose last job started longest ago (never: first); this alternates users
   round-robin when each has jobs waiting;
3. within one owner, the oldest job first (first in, first out).

Not eligible: jobs whose referenced job (dataset, model) is still queued or running (they would
only defer), jobs of owners at their ``max_running_jobs`` (admin quota, per user or the server's
setting), and re-queued jobs of lost workers (``attempts > 0``: they wait for their own
back-off message). When nothing else is eligible the token's own job runs; when that job's owner
is at the running limit the token is put back with a delay (:data:`WAIT`).

A job that just took a turn is marked ``stage = "taking turn"`` until its worker claims it, so a
second worker never takes it away between the swap and the claim.

Effect: with one worker, 15 jobs of bob and then one of carol, carol's job starts as soon as the
job running when she submitted ends (``tests/integration/test_fair_queue.py``); before, it
waited for all 15.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from calseg.service.models import Job, User, utcnow
from calseg.service.settings import Settings

log = logging.getLogger("calseg.service.fairness")

TAKING_TURN = "taking turn"
"""``jobs.stage`` of a queued job that was given a worker's token and is about to start."""
WAIT = "wait"
"""What :func:`take_turn` answers when the token's job may not start now (its owner is at the
running limit and no other job is eligible): the token goes back to the broker with a delay."""
RECENT = timedelta(days=1)
"""Only starts within this window count for "whose last job started longest ago"."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def queue_kinds(kind: str) -> list[str]:
    """The job kinds that share ``kind``'s queue."""
    from calseg.service.kinds import KINDS, queue_of

    queue = queue_of(kind)
    return [k for k, spec in KINDS.items() if spec.queue == queue]


def _aware(value: datetime | None) -> datetime:
    if value is None:
        return _EPOCH
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def running_limits(session: Session, owners: Iterable[str | None], settings: Settings) -> dict:
    """``{owner id: max running jobs or None}`` (the user's own value, else the server's)."""
    ids = [o for o in set(owners) if o is not None]
    own = dict(
        session.execute(select(User.id, User.max_running_jobs).where(User.id.in_(ids))).all()
    )
    default = settings.max_running_jobs
    return {o: (own.get(o) if own.get(o) is not None else default) for o in set(owners)}


def fair_order(candidates: list[Any], running: dict, last_start: dict) -> list[Any]:
    """``candidates`` (rows with ``owner_id``, ``created_at``, ``id``) in fair order (module
    docstring): fewest running jobs of the owner, then the owner's oldest last start, then the
    job's age."""
    return sorted(
        candidates,
        key=lambda c: (
            running.get(c.owner_id, 0),
            _aware(last_start.get(c.owner_id)),
            _aware(c.created_at),
            c.id,
        ),
    )


def _waiting_on_upstream(session: Session, rows: list[Any]) -> set[str]:
    """Ids of candidate jobs whose referenced job is still queued or running."""
    from calseg.service.kinds import references

    refs: dict[str, list[str]] = {}
    for row in rows:
        for name in references(row.kind):
            ref = (row.params or {}).get(name)
            if ref:
                refs.setdefault(row.id, []).append(ref)
    wanted = {r for rs in refs.values() for r in rs}
    if not wanted:
        return set()
    busy = set(
        session.scalars(
            select(Job.id).where(Job.id.in_(wanted), Job.state.in_(("queued", "running")))
        )
    )
    return {job_id for job_id, rs in refs.items() if busy & set(rs)}


def take_turn(url: str, job_id: str, dispatch_id: str, settings: Settings) -> str:
    """The job a worker holding token ``dispatch_id`` should run now.

    Returns the id of the job holding the token afterwards (``job_id``'s or, after a swap, the
    fairest eligible job's), ``job_id`` unchanged when no queued job holds the token (a stale
    message: :func:`calseg.service.jobs.run_job` skips it) or the holder is not queued (a
    redelivery of a running job's message), or :data:`WAIT`.
    """
    from calseg.service.db import session_scope

    with session_scope(url) as session:
        holder = session.scalar(select(Job).where(Job.dispatch_id == dispatch_id))
        if holder is None:
            return job_id
        if holder.state != "queued":
            return holder.id
        kinds = queue_kinds(holder.kind)
        rows = session.execute(
            select(
                Job.id,
                Job.owner_id,
                Job.kind,
                Job.params,
                Job.created_at,
                Job.dispatch_id,
                Job.attempts,
                Job.stage,
            ).where(Job.state == "queued", Job.kind.in_(kinds))
        ).all()
        starting = (Job.state == "queued") & (Job.stage == TAKING_TURN)
        running = dict(
            session.execute(
                select(Job.owner_id, func.count())
                .where((Job.state == "running") | starting)
                .group_by(Job.owner_id)
            ).all()
        )
        last_start = dict(
            session.execute(
                select(Job.owner_id, func.max(Job.started_at))
                .where(Job.kind.in_(kinds), Job.started_at >= utcnow() - RECENT)
                .group_by(Job.owner_id)
            ).all()
        )
        limits = running_limits(session, [r.owner_id for r in rows], settings)
        blocked = _waiting_on_upstream(session, rows)

        def eligible(row: Any) -> bool:
            limit = limits.get(row.owner_id)
            if limit is not None and running.get(row.owner_id, 0) >= limit:
                return False
            if row.id in blocked:
                return False
            if row.id == holder.id:
                return True
            return row.attempts == 0 and row.stage != TAKING_TURN and row.dispatch_id is not None

        ordered = [r for r in fair_order(rows, running, last_start) if eligible(r)]
        if not ordered:
            limit = limits.get(holder.owner_id)
            if limit is not None and running.get(holder.owner_id, 0) >= limit:
                return WAIT
            return holder.id
        chosen = ordered[0]
        if chosen.id == holder.id:
            return holder.id
        # swap tokens: the chosen job takes the one in hand, the holder takes the chosen's
        res = session.execute(
            update(Job)
            .where(
                Job.id == chosen.id,
                Job.state == "queued",
                Job.dispatch_id == chosen.dispatch_id,
                Job.stage != TAKING_TURN,
            )
            .values(
                dispatch_id=dispatch_id,
                stage=TAKING_TURN,
                message="its owner's turn: started before older jobs of other users",
            )
        )
        if res.rowcount != 1:
            session.rollback()
            return holder.id
        res = session.execute(
            update(Job)
            .where(Job.id == holder.id, Job.state == "queued", Job.dispatch_id == dispatch_id)
            .values(dispatch_id=chosen.dispatch_id, stage="queued")
        )
        if res.rowcount != 1:
            session.rollback()
            return holder.id
        session.commit()
        log.info(
            "token %s: job %s (owner %s) runs before job %s (owner %s)",
            dispatch_id[:8],
            chosen.id,
            chosen.owner_id,
            holder.id,
            holder.owner_id,
        )
        return chosen.id
