"""Per-user job limits and quotas, set by an admin.

Columns of ``users`` (all NULL = the server's setting of the same name applies,
:func:`calseg.service.costs.effective_limits`): ``max_job_memory_bytes``,
``max_job_disk_bytes`` (BIGINT), ``max_job_time_s`` (FLOAT), ``max_queued_jobs``,
``max_running_jobs`` (INTEGER), each with a CHECK that it is positive. Existing users keep the
server's limits (NULL). Downgrade drops the columns (the per-user values are lost).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = (
    ("max_job_memory_bytes", sa.BigInteger()),
    ("max_job_disk_bytes", sa.BigInteger()),
    ("max_job_time_s", sa.Float()),
    ("max_queued_jobs", sa.Integer()),
    ("max_running_jobs", sa.Integer()),
)


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        for name, type_ in COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))
            batch_op.create_check_constraint(f"{name}_positive", f"{name} IS NULL OR {name} > 0")


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        for name, _ in reversed(COLUMNS):
            batch_op.drop_constraint(batch_op.f(f"ck_users_{name}_positive"), type_="check")
            batch_op.drop_column(name)
