"""Sweeps (issue 18): sweeps, their trials, and jobs.sweep_id.

Revision ID: 0002_sweeps
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_sweeps"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("total_trials", sa.Integer(), nullable=False),
        sa.Column("baseline_job_id", sa.String(128), nullable=True),
        sa.Column("baseline_result", sa.JSON(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_sweeps_tenant_created", "sweeps", ["tenant_id", "created_at", "id"])
    op.create_index("ix_sweeps_state", "sweeps", ["state"])
    op.create_table(
        "sweep_trials",
        sa.Column("sweep_id", sa.String(128), sa.ForeignKey("sweeps.id"), primary_key=True),
        sa.Column("trial_index", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.String(128), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    # A plain column on jobs (no foreign key): adding one would make SQLite copy the jobs table.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sweep_id", sa.String(128), nullable=True))
    op.create_index("ix_jobs_sweep", "jobs", ["sweep_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_sweep", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("sweep_id")
    op.drop_table("sweep_trials")
    op.drop_table("sweeps")
