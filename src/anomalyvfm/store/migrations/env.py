"""Alembic's environment for the store: migrations run on the connection `database.migrate` hands over
(in `config.attributes`), inside its transaction, never on a URL of their own."""
from __future__ import annotations

from alembic import context

from anomalyvfm.store.schema import metadata

context.configure(connection=context.config.attributes["connection"], target_metadata=metadata,
                  transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
