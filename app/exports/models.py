"""Export snapshots: immutable, checksummed preference datasets."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigId, CreatedAt, IdPK, JSONType


class ExportSnapshot(Base):
    __tablename__ = "export_snapshots"

    id: Mapped[IdPK]
    created_by_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"), index=True)
    created_at: Mapped[CreatedAt]
    format: Mapped[str] = mapped_column(String(32))  # trl, rankings, soft, sft
    parameters: Mapped[dict[str, Any]] = mapped_column(
        JSONType, default=dict
    )  # filters, split, seed
    row_counts: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)  # per split
    files: Mapped[list[dict[str, Any]]] = mapped_column(
        JSONType, default=list
    )  # name, bytes, sha256
    manifest_sha256: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str | None] = mapped_column(Text)  # folder under PREFLOOP_DATA_DIR/exports
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending, ready, failed
    error: Mapped[str | None] = mapped_column(Text)
