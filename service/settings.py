"""Gateway settings: one class, read from `FSAR_*` environment variables, overridable by CLI flags.

Every field has a description; the README's settings table is generated from them
(`settings_table()` gives the rows).
"""
from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.bounds import MAX_LABELS, MAX_SEGMENTS, MAX_TTL_S

ENV_PREFIX = "FSAR_"
_NONE_WORDS = {"", "none", "null", "random"}


class Settings(BaseSettings):
    """Everything the gateway can be told. Env var = `FSAR_` + field name in upper case."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    # ------------------------------------------------------------------ network
    host: str = Field("127.0.0.1", description="Address the HTTP server binds to (0.0.0.0 for all interfaces).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port.")
    workers: int = Field(1, ge=1, description="Uvicorn worker processes; each loads its own backend and store pool.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the gateway and uvicorn.")

    # ------------------------------------------------------------------ model
    backbone: str = Field("ViT-B-16", description="open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14, fsar-tiny).")
    pretrained: str | None = Field(
        "openai",
        description="Backbone weights: an open_clip pretrained tag, a local weights file, or 'none' for random "
                    "weights (demo/tests only). Offline without cached weights the server stops at start-up.")
    checkpoint: str | None = Field(
        None, description="Adapted checkpoint (from `fsar train`); overrides backbone/adapter/metric/num_frames. "
                          "Its backbone weights come from the source it records, or from `pretrained` when "
                          "that is a local file with the same weights.")
    adapter: str | None = Field(
        None, description="Adapter type when no checkpoint is given (none | ted | ma | ted+ma); "
                          "unset = the model's default (ted).")
    metric: str | None = Field(
        None, description="Temporal metric (otam | bimhm | mean | trx) when no checkpoint is given; "
                          "unset = the model's default (otam).")
    num_frames: int | None = Field(
        None, ge=1, le=64,
        description="Frames sampled per video when no checkpoint is given; unset = the model's default (8).")
    seed: int = Field(
        0, description="Seed of the initial weights of a model built without a checkpoint (adapters, heads, and "
                       "the backbone when pretrained=none), so replicas and restarts share one fingerprint.")
    demo: bool = Field(False, description="Demo mode: the model card says 'demo model' (random tiny weights allowed).")

    # ------------------------------------------------------------------ backend
    backend: Literal["embedded", "triton"] = Field(
        "embedded",
        description="Where the model runs: 'embedded' (in-process torch) or 'triton' (tritonclient gRPC).")
    triton_url: str = Field(
        "127.0.0.1:8001",
        description="Triton gRPC servers for backend=triton: host:port, several as host1:8001,host2:8001, or "
                    "dns:///name:port for every address a name resolves to (re-resolved every "
                    "triton_dns_refresh_s). Requests are balanced over the servers in service; all must serve "
                    "the same export.")
    triton_timeout_s: float = Field(
        30.0, gt=0, description="Timeout of one Triton request, in seconds (retries on another server included).")
    triton_health_interval_s: float = Field(
        2.0, gt=0, description="Seconds between health checks of each Triton server (server and model "
                               "readiness); a failing server is out until a check finds it ready again.")
    triton_dns_refresh_s: float = Field(
        30.0, gt=0, description="Seconds between resolutions of dns:/// Triton targets (servers that appear or "
                                "disappear join or leave the pool).")
    encode_concurrency: int | None = Field(
        None, ge=1,
        description="Encoder calls running at once (embedded: threads of the encode pool; the few-shot head has a "
                    "lane of its own). Unset or 'auto': on CPU min(4, cores) calls sharing the cores the decode "
                    "workers leave, at least one thread each; on a GPU 1.")

    # ------------------------------------------------------------------ store
    redis_url: str | None = Field(
        None, description="Redis URL: redis://host:6379/0, rediss://... (TLS; ?ssl_ca_certs=/ca.pem), "
                          "redis+cluster://h1:7000,h2:7001 (Redis Cluster seed nodes) or "
                          "redis+sentinel://s1:26379,s2:26379/mymaster/0 (Sentinel). Unset = in-process store (lost "
                          "on restart, one worker only; said at start-up).")
    redis_prefix: str = Field("fsar:", min_length=1, description="Prefix of every Redis key this gateway writes.")
    support_set_ttl_s: int | None = Field(
        None, gt=0, le=MAX_TTL_S,
        description=f"Default lifetime of a support set in seconds, 1 to {MAX_TTL_S} (10 years; per-request "
                    "ttl_seconds overrides); None = forever.")
    query_cache_ttl_s: int | None = Field(
        3600, gt=0, le=MAX_TTL_S,
        description=f"Lifetime of cached query/text features in seconds, 1 to {MAX_TTL_S}; None = forever.")

    # ------------------------------------------------------------------ uploads and decoding
    max_upload_mb: float = Field(
        200.0, gt=0, description="Largest request body in MB (all files together); larger -> 413.")
    max_files_per_request: int = Field(
        64, ge=1, le=MAX_LABELS, description=f"Most video files in one request (at most {MAX_LABELS}); more -> 413.")
    upload_dir: str | None = Field(
        None, description="Folder each uploaded video is streamed to (one temporary file, removed when its request "
                          "ends), so the gateway never holds an upload in memory; decode workers read the file. "
                          "Unset = the system temporary folder (TMPDIR). Needs room for the uploads in flight (the "
                          "multipart parser also spools files over 1 MB to TMPDIR while a body arrives); full or "
                          "unwritable -> 503.")
    max_labels_per_request: int = Field(
        256, ge=1, le=MAX_LABELS,
        description=f"Most labels in one classify request (zero-shot/hybrid candidates; at most {MAX_LABELS}); "
                    "more -> 413.")
    max_video_seconds: float = Field(600.0, gt=0, description="Longest accepted video in seconds; longer -> 413.")
    max_pixels: int = Field(4096 * 4096, gt=0, description="Most pixels per frame (width x height); more -> 413.")
    decode_timeout_s: float = Field(30.0, gt=0, description="Time budget to decode one video, in seconds; over -> 415.")
    max_segments: int = Field(
        600, ge=1, le=MAX_SEGMENTS,
        description="Most windows one video may be cut into with segment_seconds (POST /classify); more -> 413 "
                    "too_many_segments, before any frame is decoded.")
    decode_concurrency: int = Field(
        2, ge=1, description="Videos decoded at once (decode worker processes, or threads with "
                             "decode_isolation=thread).")
    decode_isolation: Literal["process", "thread"] = Field(
        "process",
        description="Where videos are decoded: 'process' (worker processes; a decode that overruns "
                    "decode_timeout_s is killed and its worker replaced) or 'thread' (in the gateway process; "
                    "only the decoder's own time budget applies).")

    # ------------------------------------------------------------------ access
    api_keys: str | None = Field(
        None, repr=False,
        description="API keys as 'tenant:key,tenant:key' (keys of 16+ characters; a tenant may have several). "
                    "Unset (and no api_keys_file) = no authentication (said at start-up).")
    api_keys_file: str | None = Field(
        None, description="File with one 'tenant:key' per line ('#' comments) instead of api_keys.")
    rate_limit_per_minute: float | None = Field(
        None, gt=0, description="Requests per minute per tenant (per client address without API keys), "
                                "shared by replicas through Redis; over it -> 429 with Retry-After. None = off.")
    rate_limit_burst: int = Field(
        10, ge=1, description="Requests a tenant may send at once before rate_limit_per_minute paces it.")

    # ------------------------------------------------------------------ classification
    hybrid_text_weight: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Hybrid mode weight w: p = w * p_zero_shot + (1 - w) * p_few_shot.")

    # ------------------------------------------------------------------ jobs and webhooks
    job_workers: int = Field(
        1, ge=1, le=64, description="Jobs (POST /jobs) worked at once by each gateway process; each runs one "
                                    "classification like a POST /classify request.")
    max_queued_jobs: int = Field(
        100, ge=1, le=100_000,
        description="Most jobs waiting in one gateway process's queue; past it POST /jobs -> 429 with Retry-After.")
    job_ttl_s: int = Field(
        86400, gt=0, le=MAX_TTL_S,
        description=f"Lifetime of a job record and its result in the store, in seconds (1 to {MAX_TTL_S}), "
                    "counted from its last change.")
    job_dir: str | None = Field(
        None, description="Folder holding each queued job's video until the job ends (one subfolder per job), on "
                          "this replica's own disk: a restarted gateway re-queues the jobs whose video is still "
                          "there. Unset = a 'fsar-jobs' folder in upload_dir (or TMPDIR); keep it on a persistent "
                          "volume for jobs to survive a container's replacement.")
    webhook_secrets: str | None = Field(
        None, repr=False,
        description="Secrets that sign job callbacks (callback_url), as 'tenant:secret,tenant:secret'; the tenant "
                    "'*' signs for every tenant without its own entry and for a gateway without API keys. Unset = "
                    "callback_url is refused (422).")
    webhook_allow_private: bool = Field(
        False, description="Allow callback_url on loopback, private, link-local and other non-public addresses "
                           "(tests, a private network); off: such URLs are refused with 422.")
    webhook_max_attempts: int = Field(
        5, ge=1, le=20,
        description="Deliveries tried per job callback (backoff 1, 2, 4 ... s, at most 60 s) until one gets a 2xx.")
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="Time budget of one callback delivery, in seconds.")


    # ------------------------------------------------------------------ encoder runtime (embedded backend)
    runtime: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="Where the embedded backend runs the video and text encoders: 'onnxruntime' (ONNX graphs of "
                    "the same model, built once per model fingerprint and cached in onnx_cache_dir; about 2x "
                    "faster than torch on CPU), 'torch', or 'auto' (onnxruntime on CPU when installed, else torch; "
                    "the start-up log says which). The few-shot head always runs in torch.")
    precision: Literal["fp32", "int8"] = Field(
        "fp32",
        description="Encoder precision with runtime onnxruntime: 'fp32' (features match torch within 1e-4; same "
                    "fingerprint) or 'int8' (dynamic quantisation of the weights: faster on CPU, features differ "
                    "slightly, so the model gets its own fingerprint and caches; see docs/performance.md).")
    onnx_cache_dir: str | None = Field(
        None, description="Folder of the cached ONNX encoder graphs (<fingerprint>-<precision>/); unset = "
                          "$FSAR_ONNX_CACHE or ~/.cache/fsar/onnx.")


    @field_validator("pretrained", "checkpoint", "redis_url", "metric", "api_keys", "api_keys_file", "upload_dir",
                     "job_dir", "webhook_secrets", "onnx_cache_dir", mode="before")
    @classmethod
    def _none_words(cls, value: Any) -> Any:
        """Let environment variables and flags spell None ('none', 'null', '')."""
        if isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
            return None
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_form(cls, value: str | None) -> str | None:
        """A URL the store cannot use stops the gateway at start-up, not at the first request."""
        if value is not None:
            from service.store.redis_client import parse_redis_url

            parse_redis_url(value)
        return value

    @field_validator("support_set_ttl_s", "query_cache_ttl_s", "num_frames", "rate_limit_per_minute",
                     mode="before")
    @classmethod
    def _none_numbers(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _NONE_WORDS | {"0", "forever"}:
            return None
        return value

    @field_validator("encode_concurrency", mode="before")
    @classmethod
    def _auto_number(cls, value: Any) -> Any:
        """'auto' (or 'none', '') = choose from the device and the cores."""
        if isinstance(value, str) and value.strip().lower() in _NONE_WORDS | {"auto"}:
            return None
        return value

    @field_validator("triton_url", mode="before")
    @classmethod
    def _triton_targets(cls, value: Any) -> Any:
        """A list, or a comma-separated string, of host:port / dns:///name:port targets (checked here)."""
        from service.backends.triton_targets import normalise

        return normalise(value) if isinstance(value, (str, list, tuple)) else value

    @field_validator("runtime", "precision", mode="before")
    @classmethod
    def _lower_choice(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_combinations(self) -> "Settings":
        if self.workers > 1 and self.redis_url is None:
            raise ValueError("workers > 1 needs a shared store: set redis_url (FSAR_REDIS_URL); "
                             "each worker would otherwise hold its own support sets")
        if self.api_keys is not None and self.api_keys_file is not None:
            raise ValueError("set either api_keys (FSAR_API_KEYS) or api_keys_file (FSAR_API_KEYS_FILE), not both")
        if self.precision == "int8" and self.runtime == "torch":
            raise ValueError("precision int8 needs runtime onnxruntime (or auto): set FSAR_RUNTIME=onnxruntime")
        return self

    # ------------------------------------------------------------------ helpers
    @classmethod
    def from_cli(cls, **overrides: Any) -> "Settings":
        """Settings from the environment, with every override that is not None taking precedence.

        The CLI passes its flags here (a flag left unset arrives as None and keeps the env/default value).
        """
        return cls(**{name: value for name, value in overrides.items() if value is not None})

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def log_level_number(self) -> int:
        return getattr(logging, self.log_level.upper())

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict with API keys and any password in the Redis URL masked (for logs and /model)."""
        values = self.model_dump()
        for secret in ("api_keys", "webhook_secrets"):
            if values.get(secret):
                values[secret] = "***"
        url = values.get("redis_url")
        if url and "@" in url:
            scheme, _, rest = url.partition("://")
            values["redis_url"] = f"{scheme}://***@{rest.split('@', 1)[1]}"
        return values


def settings_table() -> list[dict[str, str]]:
    """Rows for the README settings table: name, env var, default, description."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        rows.append({
            "name": name,
            "env": f"{ENV_PREFIX}{name.upper()}",
            "default": "None" if default is None else str(default),
            "description": field.description or "",
        })
    return rows


def settings_table_markdown() -> str:
    """The settings table as Markdown (`| name | env var | default | description |`)."""
    lines = ["| setting | env var | default | description |", "| --- | --- | --- | --- |"]
    for row in settings_table():
        description = row["description"].replace("|", "\\|")  # a bare | would split the cell
        lines.append(f"| `{row['name']}` | `{row['env']}` | `{row['default']}` | {description} |")
    return "\n".join(lines)
