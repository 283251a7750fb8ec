"""Users and API tokens; owners of jobs and recordings; metric steps; job provenance.

* ``users`` and ``api_tokens`` (only the token's sha256 is stored).
* ``jobs.owner_id`` and ``recordings.owner_id`` (FK users, SET NULL on user deletion).
  Rows that exist already are given to a new admin user ``local`` (the embedded default's
  user), so a ``make serve`` database keeps showing its jobs after the upgrade.
* Upload dedup becomes per owner: ``UNIQUE(recordings.sha256)`` is replaced by
  ``UNIQUE(owner_id, sha256)``.
* ``metrics.step`` (training-curve points) and ``jobs.provenance`` (JSON).

Downgrade drops all of it (owners, tokens and users are lost; a database holding the same
file uploaded by two owners cannot go back to a global ``UNIQUE(sha256)`` and fails loudly).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 21:30:00
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_api_tokens_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_api_tokens_token_sha256")),
    )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_tokens_user_id"), ["user_id"], unique=False)

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("provenance", sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_owner_id"), ["owner_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_jobs_owner_id_users"), "users", ["owner_id"], ["id"], ondelete="SET NULL"
        )
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.add_column(sa.Column("step", sa.Integer(), nullable=True))
    with op.batch_alter_table("recordings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_id", sa.String(length=36), nullable=True))
        batch_op.drop_constraint("uq_recordings_sha256", type_="unique")
        batch_op.create_unique_constraint("uq_recordings_owner_id_sha256", ["owner_id", "sha256"])
        batch_op.create_index(batch_op.f("ix_recordings_owner_id"), ["owner_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_recordings_sha256"), ["sha256"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_recordings_owner_id_users"),
            "users",
            ["owner_id"],
            ["id"],
            ondelete="SET NULL",
        )

    # existing rows get an owner: the admin user "local" (created only when there are rows)
    conn = op.get_bind()
    n_rows = conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar() or 0
    n_rows += conn.execute(sa.text("SELECT count(*) FROM recordings")).scalar() or 0
    if n_rows:
        user_id = str(uuid.uuid4())
        users = sa.table(
            "users",
            sa.column("id", sa.String),
            sa.column("name", sa.String),
            sa.column("is_admin", sa.Boolean),
            sa.column("created_at", sa.DateTime(timezone=True)),
        )
        op.bulk_insert(
            users,
            [{"id": user_id, "name": "local", "is_admin": True, "created_at": datetime.now(UTC)}],
        )
        for table in ("jobs", "recordings"):
            conn.execute(sa.text(f"UPDATE {table} SET owner_id = :u"), {"u": user_id})


def downgrade() -> None:
    with op.batch_alter_table("recordings", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_recordings_owner_id_users"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_recordings_sha256"))
        batch_op.drop_index(batch_op.f("ix_recordings_owner_id"))
        batch_op.drop_constraint("uq_recordings_owner_id_sha256", type_="unique")
        batch_op.create_unique_constraint("uq_recordings_sha256", ["sha256"])
        batch_op.drop_column("owner_id")
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.drop_column("step")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_jobs_owner_id_users"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_jobs_owner_id"))
        batch_op.drop_column("provenance")
        batch_op.drop_column("owner_id")
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_tokens_user_id"))
    op.drop_table("api_tokens")
    op.drop_table("users")
