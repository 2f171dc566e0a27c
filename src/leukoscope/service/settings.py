"""Service settings: typed, with ``LEUKOSCOPE_*`` environment variables.

Every field can be given as ``LEUKOSCOPE_<FIELD>`` (upper case), e.g.
``LEUKOSCOPE_DATA_DIR=/srv/leukoscope``, ``LEUKOSCOPE_DATABASE_URL=postgresql+psycopg://...``.
Explicit keyword arguments (the CLI's options) win over the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from leukoscope.pretrained import resolve_bundle

ENV_PREFIX = "LEUKOSCOPE_"


class ServiceSettings(BaseModel):
    """Everything the web service needs to start."""

    model_config = {"extra": "forbid", "frozen": True}

    #: Cell-classifier bundle directory, or ``pretrained:NAME`` for a shipped model (required to
    #: serve; ``leukoscope serve`` defaults to the shipped classifier when the install has one).
    bundle: Path | None = None
    #: Optional detector bundle (or ``pretrained:NAME``): enables smear-field analysis.
    detector: Path | None = None
    #: Where the SQLite database and the content-addressed image store live.
    #: Nothing under it is ever served as a static directory.
    data_dir: Path = Path("leukoscope-data")
    #: SQLAlchemy URL; default ``sqlite:///<data_dir>/leukoscope.db``.
    database_url: str | None = None
    #: Run Alembic migrations to head at start-up.
    migrate: bool = True

    # ---- limits
    #: Largest request body accepted for an upload (all files together).
    max_upload_bytes: int = Field(default=30 * 1024 * 1024, gt=0)
    #: Largest image, in pixels (decompression-bomb guard; checked before decoding).
    max_pixels: int = Field(default=40_000_000, gt=0)
    #: Most pixels of all the images of one upload together (checked from the headers,
    #: before any decoding; the files are then decoded one at a time).
    max_pixels_per_request: int = Field(default=80_000_000, gt=0)
    #: Most images in one upload (one case).
    max_files_per_upload: int = Field(default=20, gt=0)
    #: Uploads per user per minute (counted in the database, for every process); 0: no limit.
    rate_limit_per_minute: int = Field(default=60, ge=0)
    #: Failed log-ins per user name *and* client address per 15 minutes; past it, each
    #: further attempt from there waits 2, 4, 8 ... s (at most 15 min). The same for
    #: re-entering one's password (password change, new token).
    login_failures_allowed: int = Field(default=5, ge=1)
    #: Failed log-ins per user name from all addresses per 15 minutes before the account is
    #: locked for the rest of the window (sustained, distributed guessing; an admin can clear it).
    login_user_lock_failures: int = Field(default=50, ge=1)
    #: Failed log-ins from one client address (an IPv6 /64) over all user names per 15 minutes.
    login_address_failures: int = Field(default=100, ge=1)
    #: Argon2 password checks running at once per process (each ~64 MiB); the excess gets 503.
    password_checks: int = Field(default=2, ge=1)
    #: Throttle entries kept at most (expired ones are deleted anyway).
    throttle_max_rows: int = Field(default=100_000, ge=10)
    #: Days an API token lasts unless its creator chooses fewer (at most 365).
    token_days: int = Field(default=90, ge=1, le=365)

    # ---- sessions
    #: At least a minute (a cookie's max-age is whole seconds), at most 30 days.
    session_hours: float = Field(default=12.0, ge=1 / 60, le=24 * 30)
    #: ``auto``: the Secure flag is set when the request came over HTTPS (directly or
    #: through a trusted proxy's X-Forwarded-Proto); ``always``/``never`` force it.
    secure_cookies: Literal["auto", "always", "never"] = "auto"

    # ---- inference
    #: Threads that run the model (each holds its own copy, so Grad-CAM hooks never mix).
    inference_threads: int = Field(default=2, ge=1)
    #: torch intra-op threads per inference thread (and onnxruntime's / OpenVINO's on those backends).
    torch_threads: int = Field(default=1, ge=1)
    #: What runs the detector's network: ``torch``, ``onnxruntime`` or ``openvino`` (a detector bundle
    #: from ``leukoscope export``), or ``auto`` (the fastest installed one the bundle has a graph for).
    detector_backend: Literal["auto", "torch", "onnxruntime", "openvino"] = "torch"
    #: What runs the classifier's network (leukoscope.inference.runtime): ``torch`` (default: every
    #: bundle has it), or, for a bundle from ``leukoscope export``, ``onnxruntime``, ``openvino`` or
    #: ``auto`` (the fastest installed backend that can run its graph). Grad-CAM still needs the torch
    #: model, so it is loaded as well while ``gradcam`` is on; the answers (and the flag thresholds fitted
    #: on the graph's scores) stay the graph's, the heatmap is the torch model's map of the graph's class.
    classifier_backend: Literal["auto", "torch", "onnxruntime", "openvino"] = "torch"
    #: Below this confidence a cell is "uncertain, review" (default: the bundle's own threshold).
    uncertain_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    #: Classifier classes counted as blasts, comma-separated (``leukoscope serve --blast-class``, as
    #: ``analyze``'s); default: the classes named blast by :data:`leukoscope.labels.BLAST_CLASS_NAMES`.
    blast_classes: str | None = None
    #: Compute a Grad-CAM overlay for every classified cell.
    gradcam: bool = True
    #: fsync stored files and their folder before the database commit (power-loss safety).
    fsync: bool = True

    @field_validator("bundle", "detector", mode="before")
    @classmethod
    def _shipped(cls, value: Any) -> Any:
        # pretrained:NAME -> the shipped model's folder (a clear error naming the shipped ones if absent)
        return resolve_bundle(value) if isinstance(value, (str, Path)) else value

    @field_validator("bundle", "detector", "data_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @property
    def blast_class_list(self) -> list[str] | None:
        """:attr:`blast_classes` as names (None: the default rule)."""
        if self.blast_classes is None:
            return None
        return [name.strip() for name in self.blast_classes.split(",") if name.strip()]

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'leukoscope.db').resolve()}"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "ServiceSettings":
        """Settings from ``LEUKOSCOPE_*`` variables, then ``overrides`` (``None`` values ignored)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
