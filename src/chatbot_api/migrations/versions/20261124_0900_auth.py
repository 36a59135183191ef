"""auth: principals, hashed API keys, and an owner for every conversation

Conversations stored before auth existed are given to the "local" principal that this
migration creates (it is also the single user of AUTH_MODE=disabled), so no row is ever
orphaned; only then does `owner_id` become NOT NULL.

Revision ID: b7e2c4a91d05
Revises: c3f1d8e6a2b4
Create Date: 2026-11-24 09:00:00
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "b7e2c4a91d05"
down_revision: str | None = "c3f1d8e6a2b4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# chatbot_api.auth.models.LOCAL_PRINCIPAL_ID (a migration never imports application code).
LOCAL_PRINCIPAL_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")


def upgrade() -> None:
    op.create_table(
        "principals",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_principals")),
        sa.UniqueConstraint("name", name=op.f("uq_principals_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("principal_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("hint", sa.String(length=16), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("concurrent_streams", sa.Integer(), nullable=True),
        sa.Column("tokens_per_day", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["principal_id"], ["principals.id"], name=op.f("fk_api_keys_principal_id_principals")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("secret_hash", name=op.f("uq_api_keys_secret_hash")),
    )
    op.create_index(op.f("ix_api_keys_principal_id"), "api_keys", ["principal_id"], unique=False)

    principals = sa.table(
        "principals",
        sa.column("id", sa.Uuid()),
        sa.column("name", sa.String()),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    op.bulk_insert(
        principals, [{"id": LOCAL_PRINCIPAL_ID, "name": "local", "created_at": datetime.now(UTC)}]
    )

    # Add the column nullable, give every existing row an owner, then tighten it.
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("owner_id", sa.Uuid(), nullable=True))
    conversations = sa.table("conversations", sa.column("owner_id", sa.Uuid()))
    op.execute(conversations.update().values(owner_id=LOCAL_PRINCIPAL_ID))
    with op.batch_alter_table("conversations") as batch:
        batch.alter_column("owner_id", existing_type=sa.Uuid(), nullable=False)
        batch.create_foreign_key(
            op.f("fk_conversations_owner_id_principals"), "principals", ["owner_id"], ["id"]
        )
        batch.create_index(
            "ix_conversations_owner_id_created_at_id",
            ["owner_id", "created_at", "id"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.drop_index("ix_conversations_owner_id_created_at_id")
        batch.drop_constraint(op.f("fk_conversations_owner_id_principals"), type_="foreignkey")
        batch.drop_column("owner_id")
    op.drop_index(op.f("ix_api_keys_principal_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("principals")
