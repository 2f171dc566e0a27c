"""Request parameters shared by the API and the pages: numbers bounded as the database stores them,
so that an id or offset past its column's range is a 422, not a database error (500)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

#: The largest row id (the tables' ``Integer`` primary keys: 32-bit in PostgreSQL).
MAX_ROW_ID = 2**31 - 1

RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
"""A table row's id in a URL path."""

Offset = Annotated[int, Query(ge=0, le=MAX_ROW_ID)]
"""How many rows of a listing to skip."""
