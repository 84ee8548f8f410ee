"""Alembic revisions of the label database's schema; ``alignkit.labeling.storage.migrate`` runs them."""
