"""Alembic environment: runs on the connection `Database.upgrade` hands over (never reads an
ini file or the URL itself, so credentials stay in settings)."""

from alembic import context

from service.store.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
