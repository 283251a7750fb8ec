"""Per-user storage quota: ``users.max_storage_bytes`` (BIGINT, NULL = the server's
``max_user_storage_bytes``, CHECK positive) and ``jobs.stored_bytes`` (BIGINT: the bytes of
the job's folder when it ended; NULL while it runs and for jobs that ended before). One user's
uploads and jobs could fill the disk down to ``min_free_disk_bytes``, after which every other
user's uploads (507) and jobs (422) were refused. Downgrade drops both columns.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 06:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_storage_bytes", sa.BigInteger(), nullable=True))
        batch_op.create_check_constraint(
            "max_storage_bytes_positive", "max_storage_bytes IS NULL OR max_storage_bytes > 0"
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stored_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("stored_bytes")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_users_max_storage_bytes_positive"), type_="check")
        batch_op.drop_column("max_storage_bytes")
