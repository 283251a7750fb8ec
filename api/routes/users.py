"""The caller (``/api/me``) and users' limits (``/api/users``; admins see all)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, UserDep, _limits_out
from calseg.service.models import User
from calseg.service.schemas import (
    LimitsIn,
    LimitsOut,
    UserOut,
)

router = APIRouter()


@router.get("/api/me", response_model=UserOut, tags=["auth"])
def me(user: UserDep) -> UserOut:
    """The user of the token: ``{id, name, is_admin}``."""
    return UserOut.model_validate(user)


def _named_user(session: Session, name: str, caller: User) -> User:
    """User ``name`` when ``caller`` is that user or an admin; otherwise 404 exactly as for a
    name that does not exist (user names are not probed)."""
    target = session.scalar(select(User).where(User.name == name))
    if target is None or not (caller.is_admin or target.id == caller.id):
        raise HTTPException(404, f"there is no user {name!r}")
    return target


@router.get("/api/users", response_model=list[LimitsOut], tags=["auth"])
def list_users(session: SessionDep, settings: SettingsDep, user: UserDep) -> list[LimitsOut]:
    """Every user with their limits in force (admins only: 403 otherwise)."""
    if not user.is_admin:
        raise HTTPException(403, "only an admin may list the users")
    rows = session.scalars(select(User).order_by(User.created_at, User.name)).all()
    return [_limits_out(session, u, settings) for u in rows]


@router.get("/api/users/{name}/limits", response_model=LimitsOut, tags=["auth"])
def get_limits(name: str, session: SessionDep, settings: SettingsDep, user: UserDep) -> LimitsOut:
    """A user's job limits in force (their own, or the server's) and how many jobs they have
    queued or running; a user sees their own, an admin everyone's."""
    return _limits_out(session, _named_user(session, name, user), settings)


@router.put("/api/users/{name}/limits", response_model=LimitsOut, tags=["auth"])
def set_limits(
    name: str, body: LimitsIn, session: SessionDep, settings: SettingsDep, user: UserDep
) -> LimitsOut:
    """Set all of a user's job limits (admins only: 403 otherwise). Every limit of the body
    replaces the user's; one left out or null follows the server's setting again (``PATCH``
    changes only those given). Jobs already queued keep running; new submissions are checked
    against the new limits."""
    from calseg.service.costs import USER_LIMIT_FIELDS

    return _set_limits(name, body, session, settings, user, USER_LIMIT_FIELDS)


@router.patch("/api/users/{name}/limits", response_model=LimitsOut, tags=["auth"])
def change_limits(
    name: str, body: LimitsIn, session: SessionDep, settings: SettingsDep, user: UserDep
) -> LimitsOut:
    """Change some of a user's job limits (admins only: 403 otherwise): only the limits in the
    body change (null: the server's setting again); the others stay as they were, as with
    ``calseg users limits``. (``PUT`` replaces them all: a new-user check lost a quota of 3
    when a later PUT set only ``max_running_jobs``.)"""
    return _set_limits(name, body, session, settings, user, tuple(body.model_fields_set))


def _set_limits(
    name: str,
    body: LimitsIn,
    session: Session,
    settings: SettingsDep,
    user: User,
    fields: tuple[str, ...],
) -> LimitsOut:
    """Set ``fields`` of user ``name``'s limits from ``body`` (an admin's request)."""
    if not user.is_admin:
        raise HTTPException(403, "only an admin may set limits")
    target = _named_user(session, name, user)
    for field in fields:
        setattr(target, field, getattr(body, field))
    session.commit()
    return _limits_out(session, target, settings)
