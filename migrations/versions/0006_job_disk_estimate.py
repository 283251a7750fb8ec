"""A job's estimated disk, kept from its admission: ``jobs.estimated_disk_bytes`` (BIGINT,
NULL for jobs admitted before). Admission subtracts the estimates of the queued and running
jobs from the free disk (:func:`calseg.service.costs.reserved_disk_bytes`): three simulate jobs
of 36 GiB each were admitted with 59 GiB free, each checked against the free disk alone (a new
user's check). Downgrade drops the column.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 04:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("estimated_disk_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("estimated_disk_bytes")
