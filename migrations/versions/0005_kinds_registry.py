"""Job kinds come from the registry (:mod:`calseg.service.kinds`, issue 16 item 2): the CHECK on
``jobs.kind`` (the four kinds of 0001) is dropped, so that a kind added to the registry needs no
migration. Jobs are written only by :func:`calseg.service.jobs.submit_job`, which refuses kinds
the registry does not know. Downgrade puts the CHECK back; it fails while jobs of other kinds
exist (delete them first).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 21:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

KINDS_0001 = "kind IN ('simulate', 'finetune', 'infer', 'evaluate')"


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_jobs_kind"), type_="check")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_check_constraint("kind", KINDS_0001)
