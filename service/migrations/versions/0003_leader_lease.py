"""Leader election (issue 17.4): one lease row that API replicas compete for.

Revision ID: 0003_leader_lease
Revises: 0002_sweeps
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_leader_lease"
down_revision = "0002_sweeps"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "leader_lease",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("acquired_at", sa.Float(), nullable=False),
        sa.Column("renewed_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    # The row exists from the start, expired: every acquisition is then a conditional UPDATE.
    op.bulk_insert(
        table,
        [
            {
                "name": "leader",
                "holder": "",
                "epoch": 0,
                "acquired_at": 0.0,
                "renewed_at": 0.0,
                "expires_at": 0.0,
            }
        ],
    )


def downgrade() -> None:
    op.drop_table("leader_lease")
