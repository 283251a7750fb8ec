"""How an uploaded recording is read: ``recordings.read_options`` and ``recordings.info``.

* ``read_options`` (JSON): the reading options given at upload (``axes``, ``channel``,
  ``interleaved_channels``, ``z_projection``; only those given). Jobs on the recording read it
  the same way unless their own parameters say otherwise.
* ``info`` (JSON): what the reader made of the file (format, axes, stored shape, frame interval,
  pixel size, warnings), shown with the recording.

Rows uploaded before this revision keep NULL in both (read with the defaults, as before).
Downgrade drops both columns.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("recordings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("read_options", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("info", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("recordings", schema=None) as batch_op:
        batch_op.drop_column("info")
        batch_op.drop_column("read_options")
