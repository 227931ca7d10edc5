"""The service's settings: one typed object, read from arguments or ``HISTOLITE_*`` variables.

``histolite serve`` builds it from its options, ``create_app(settings)`` takes it, and uvicorn
workers (several processes) rebuild it from the environment the CLI exported with
:meth:`ServeSettings.to_env`. Every default and its explanation is written here once; the CLI's
help texts are read from these fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "HISTOLITE_"


class ServeSettings(BaseSettings):
    """What the service serves and the limits every request is held to."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    model_dir: Path = Field(
        description="an exported model folder, or a repository of them: DIR/<name>/<version>/"
    )
    api_key: str | None = Field(
        default=None, description="require this key (X-API-Key) for everything but health"
    )
    audit_db: Path | None = Field(
        default=Path("histolite_audit.sqlite"), description="SQLite audit log ('' turns it off)"
    )
    audit_key_file: Path | None = Field(
        default=None,
        description="secret key file (32+ bytes, not world-readable) keying the audit log's "
        "chain (hmac-sha256), so only its holders can extend or rebuild it; never stored in the "
        "log, and a log keyed once needs its key",
    )
    max_request_bytes: int = Field(
        default=25 * 1024 * 1024, ge=1024, description="largest request body, else 413"
    )
    max_files: int = Field(default=16, ge=1, description="images per upload")
    max_pixels: int = Field(
        default=60_000_000, ge=1, description="largest image accepted (width x height), else 413"
    )
    max_request_pixels: int = Field(
        default=120_000_000,
        ge=1,
        description="pixels of all the images of one request together, else 413: bounds the "
        "work one request holds a prediction slot for (16 images of the largest size would be "
        "minutes)",
    )
    max_connections: int = Field(
        default=64,
        ge=1,
        description="open connections and requests per worker, else 503 (uploads are read into "
        "memory before they wait for a slot: at most this x max_request_bytes)",
    )
    url_timeout: float = Field(default=10.0, gt=0, description="seconds for an image URL fetch")
    allow_private_urls: bool = Field(
        default=False, description="fetch URLs on private addresses (loopback tests only)"
    )
    threads: int | None = Field(default=None, ge=1, description="ONNX Runtime threads per model")
    slide_root: Path | None = Field(
        default=None, description="allow slide jobs (POST /v1/slides) for slides under this folder"
    )
    jobs_dir: Path | None = Field(
        default=None,
        description="slide job state and results, kept on restart (default: beside the audit log)",
    )
    slide_jobs_running: int = Field(default=1, ge=1, description="slide jobs run at once")
    slide_jobs_queued: int = Field(
        default=8, ge=1, description="slide jobs queued or running, else 429"
    )
    slide_job_max_seconds: float = Field(
        default=3600.0, gt=0, description="a slide job's wall time budget, else it fails"
    )
    slide_job_max_tiles: int = Field(
        default=250_000, ge=1, description="tissue tiles one slide job may classify, else it fails"
    )
    slide_jobs_disk_quota_mb: int = Field(
        default=10_240, ge=1, description="disk for slide job results, else new jobs get 507"
    )
    slide_jobs_retention_hours: float = Field(
        default=168.0, ge=0, description="finished slide jobs are deleted after this (0: kept)"
    )
    docs: bool = Field(
        default=False, description="Swagger UI at /docs (it loads its script from a CDN)"
    )
    open_metadata: bool = Field(
        default=False, description="with an API key: leave /v1/models, /metrics and /docs open"
    )
    max_url_fetches: int = Field(default=8, ge=1, description="concurrent URL fetches, else 429")
    body_read_timeout: float = Field(
        default=30.0, gt=0, description="seconds a request body may stall between chunks, else 408"
    )
    body_total_timeout: float = Field(
        default=120.0,
        gt=0,
        description="seconds a whole request body may take, however steadily it trickles, else "
        "408 (the largest body then needs max_request_bytes / this per second: 25 MB in 120 s "
        "is about 210 KB/s)",
    )
    head_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds a client has to send a request's line and headers, else the "
        "connection is closed (slowloris)",
    )
    max_concurrent_predictions: int = Field(
        default=2,
        ge=1,
        description="images decoded and classified at once per worker; others wait. Peak memory "
        "is about 110 MB + this x 8 bytes x max_pixels (benchmarks/decode_memory.py)",
    )

    @field_validator(
        "audit_db", "audit_key_file", "slide_root", "jobs_dir", "api_key", "threads", mode="before"
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @classmethod
    def help(cls, field: str) -> str:
        """A field's description and default, for a CLI option's help."""
        info = cls.model_fields[field]
        default = info.default
        shown = "" if default is None else f" [default: {default}]"
        return f"{(info.description or '').capitalize()}.{shown}"

    def to_env(self) -> dict[str, str]:
        """``HISTOLITE_*`` variables that rebuild these settings in a worker process.

        Paths are made absolute: workers may start in another directory. Every field is
        written, so a variable left in the shell cannot override what the CLI was given.
        """
        env = {}
        for name, value in self.model_dump().items():
            if isinstance(value, Path):
                value = value.resolve()
            if isinstance(value, bool):
                value = "1" if value else "0"
            env[f"{ENV_PREFIX}{name.upper()}"] = "" if value is None else str(value)
        return env
