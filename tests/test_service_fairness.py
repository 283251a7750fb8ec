"""Fair turns between users (calseg.service.fairness) in-process on SQLite: a recorder stands
for the broker (messages delivered first in, first out, as Redis does) and run_job for the
worker. Real Celery + Redis: tests/integration/test_fair_queue.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from calseg.service import jobs
from calseg.service.auth import create_user
from calseg.service.db import session_scope, upgrade_database
from calseg.service.models import Job, User
from calseg.service.reconcile import reconcile
from calseg.service.settings import Settings
from calseg.service.store import LocalArtifactStore

SIM = {"n_videos": 3, "n_frames": 4, "height": 128, "width": 128}


class Broker:
    """Messages ``(task id, dispatch id, countdown)`` in the order they were sent."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, float | None]] = []

    def __call__(self, job: Job, countdown: float | None = None) -> None:
        self.messages.append((job.id, job.dispatch_id, countdown))

    def pop(self) -> tuple[str, str, float | None]:
        return self.messages.pop(0)


@pytest.fixture()
def env(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'fair.db'}"
    upgrade_database(url)
    settings = Settings(
        database_url=url,
        artifact_dir=tmp_path / "art",
        cache_dir=tmp_path / "cache",
        progress_interval_s=0.0,
    )
    with session_scope(url) as s:
        users = {name: create_user(s, name) for name in ("bob", "carol", "dave")}
        ids = {name: u.id for name, u in users.items()}
    return url, settings, LocalArtifactStore(settings.artifact_dir), Broker(), ids


def _submit(env, who: str, n: int = 1, kind: str = "simulate", params=None) -> list[str]:  # noqa: ANN001
    url, settings, _, broker, _ = env
    out = []
    with session_scope(url) as s:
        owner = s.scalar(select(User).where(User.name == who))
        for i in range(n):
            p = params if params is not None else {**SIM, "seed": i}
            job = jobs.submit_job(s, kind, p, enqueue=broker, owner=owner, settings=settings)
            out.append(job.id)
    return out


def _deliver(env, runners, during=None) -> str:  # noqa: ANN001
    """The worker takes the next message and runs what it says (returns the state)."""
    url, settings, store, broker, _ = env
    task_id, dispatch, _countdown = broker.pop()
    return jobs.run_job(
        task_id, dispatch, url=url, store=store, settings=settings, enqueue=broker, runners=runners
    )


def _owner_of(url: str, job_id: str) -> str:
    with session_scope(url) as s:
        return s.get(Job, job_id).owner.name


def test_carol_runs_next_after_the_job_running_when_she_submitted(env) -> None:  # noqa: ANN001
    url = env[0]
    ran: list[str] = []
    bob = _submit(env, "bob", 5)
    carol: list[str] = []

    def runner(params, ctx):  # noqa: ANN001, ANN202
        ran.append(ctx.job_id)
        if len(ran) == 1:  # carol submits while bob's first job runs
            carol.extend(_submit(env, "carol", 1))
        return {}

    while env[3].messages:
        assert _deliver(env, {"simulate": runner}) == "succeeded"
    assert ran == [bob[0], carol[0], *bob[1:]]  # FIFO would put carol last
    with session_scope(url) as s:
        rows = s.scalars(select(Job)).all()
        assert {j.state for j in rows} == {"succeeded"}
        assert all(j.attempts == 1 for j in rows)  # each ran once
        assert len({j.dispatch_id for j in rows}) == len(rows)  # tokens stay unique


def test_backlogs_of_two_users_alternate(env) -> None:  # noqa: ANN001
    bob = _submit(env, "bob", 3)
    carol = _submit(env, "carol", 3)
    ran: list[str] = []

    def runner(params, ctx):  # noqa: ANN001, ANN202
        ran.append(ctx.job_id)
        return {}

    while env[3].messages:
        _deliver(env, {"simulate": runner})
    assert ran == [bob[0], carol[0], bob[1], carol[1], bob[2], carol[2]]


def test_running_limit_holds_a_users_jobs_and_lets_others_pass(env) -> None:  # noqa: ANN001
    url, settings, _, broker, ids = env
    with session_scope(url) as s:
        s.get(User, ids["bob"]).max_running_jobs = 1
    bob = _submit(env, "bob", 3)
    # bob's first job is running (on another worker)
    with session_scope(url) as s:
        s.get(Job, bob[0]).state = "running"
    broker.pop()  # its message was taken by that worker
    ran: list[str] = []

    def runner(params, ctx):  # noqa: ANN001, ANN202
        ran.append(ctx.job_id)
        return {}

    # bob's second message: bob is at his limit and nothing else waits -> put back, delayed
    assert _deliver(env, {"simulate": runner}) == "queued"
    assert ran == []
    assert broker.messages[-1] == (bob[1], _dispatch(url, bob[1]), jobs.DEFER_S)
    with session_scope(url) as s:
        assert "max_running_jobs" in s.get(Job, bob[1]).message
    # carol submits: the next token of bob's runs carol's job instead
    carol = _submit(env, "carol", 1)
    assert _deliver(env, {"simulate": runner}) == "succeeded"
    assert ran == [carol[0]]
    with session_scope(url) as s:  # bob's jobs still wait, each holding one message's token
        waiting = s.scalars(select(Job).where(Job.state == "queued")).all()
        assert {j.id for j in waiting} == {bob[1], bob[2]}
    on_broker = {d for _t, d, _c in broker.messages}
    assert {_dispatch(url, bob[1]), _dispatch(url, bob[2])} <= on_broker


def _dispatch(url: str, job_id: str) -> str:
    with session_scope(url) as s:
        return s.get(Job, job_id).dispatch_id


def test_jobs_waiting_for_their_dataset_do_not_take_turns(env) -> None:  # noqa: ANN001
    url, _, _, broker, ids = env
    sim = _submit(env, "carol", 1)[0]  # cpu queue, not run yet
    ft = _submit(env, "carol", 1, "finetune", {"dataset_job_id": sim, "steps": 1})[0]
    with session_scope(url) as s:  # dave's dataset is ready
        ds = Job(kind="simulate", state="succeeded", owner_id=ids["dave"], params=SIM)
        s.add(ds)
        s.flush()
        ds_id = ds.id
    dave = _submit(env, "dave", 1, "finetune", {"dataset_job_id": ds_id, "steps": 1})[0]
    broker.messages = [m for m in broker.messages if m[0] != sim]  # the gpu queue only
    ran: list[str] = []
    runner = {"finetune": lambda p, c: ran.append(c.job_id) or {}}
    # carol's finetune message comes first, but her dataset is not made: dave's job runs
    assert broker.messages[0][0] == ft
    assert _deliver(env, runner) == "succeeded"
    assert ran == [dave]
    with session_scope(url) as s:
        waiting = s.get(Job, ft)
        assert waiting.state == "queued" and waiting.attempts == 0
        assert waiting.dispatch_id == broker.messages[0][1]  # it holds dave's old message


def test_reconciler_matches_messages_by_token_after_swaps(env) -> None:  # noqa: ANN001
    url, settings, _, broker, _ = env
    bob = _submit(env, "bob", 3)
    _deliver(env, {"simulate": lambda p, c: {}})
    carol = _submit(env, "carol", 1)
    _deliver(env, {"simulate": lambda p, c: {}})  # bob's 2nd message runs carol's job
    with session_scope(url) as s:
        assert s.get(Job, carol[0]).state == "succeeded"
        assert s.get(Job, bob[1]).state == "queued"
    held = {(t, d) for t, d, _ in broker.messages}  # what Redis still holds
    # bob's 2nd job now holds carol's token, whose message names carol's job: not lost
    assert (bob[1], _dispatch(url, bob[1])) not in held
    far = Settings(**{**settings.model_dump(), "requeue_grace_s": 0.0})
    report = reconcile(url, settings=far, enqueue=broker, dispatches=lambda: held)
    assert report.redispatched == []
    # a token that really is gone (Redis flushed) is dispatched again
    report = reconcile(url, settings=far, enqueue=broker, dispatches=set)
    assert sorted(report.redispatched) == sorted([bob[1], bob[2]])
