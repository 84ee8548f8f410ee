"""The first schema: items, labelers, sessions, labels and schema_version (version 1), as alignkit wrote it
with ``create_all`` before migrations; such a database is stamped with this revision, not re-made.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Written out rather than Base.metadata.create_all: a revision is a frozen snapshot, the models move on.
    version = op.create_table("schema_version", sa.Column("version", sa.Integer(), primary_key=True))
    op.create_table(
        "items",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.Integer(), nullable=False, unique=True),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("responses", sa.Text(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
    )
    op.create_table(
        "labelers",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("labeler_id", sa.Integer(), sa.ForeignKey("labelers.id"), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("item_id", sa.Integer(), sa.ForeignKey("items.id"), nullable=False),
        sa.Column("labeler_id", sa.Integer(), sa.ForeignKey("labelers.id"), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("ranking", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("item_id", "labeler_id"),
    )
    op.bulk_insert(version, [{"version": 1}])


def downgrade() -> None:
    for table in ("labels", "sessions", "labelers", "items", "schema_version"):
        op.drop_table(table)
