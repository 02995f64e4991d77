"""All configuration, read once from the environment.

Every variable is documented in :data:`MEANINGS` (docs/configuration.md is generated from it); nothing else in the
project reads ``os.environ`` for configuration. Build one :class:`Settings` with
:meth:`Settings.from_env` at start-up and pass what each part needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_NEGATIVE_LABELS = ("background", "negative", "neg", "exclude", "not object")


class SettingsError(ValueError):
    """An environment variable holds a value of the wrong form."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(float(raw))
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not a number") from exc


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not a number") from exc


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true/false)")


def _list(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None:
        return default
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _str(env: Mapping[str, str], name: str, default: str = "") -> str:
    return env.get(name, default).strip()


def _phrases(env: Mapping[str, str], name: str) -> tuple[tuple[str, str], ...]:
    """``"Cat=tabby cat;Car=car"`` -> ``(("cat", "tabby cat"), ("car", "car"))``."""
    pairs = []
    for item in env.get(name, "").split(";"):
        if not item.strip():
            continue
        label, sep, phrase = item.partition("=")
        if not sep or not label.strip() or not phrase.strip() or len(phrase.strip()) > 200:
            raise SettingsError(f"{name} item {item.strip()!r} is not 'Label=phrase' (phrase of at most 200 "
                                "characters; items separated by ';')")
        pairs.append((label.strip().lower(), phrase.strip()))
    return tuple(pairs)


@dataclass(frozen=True)
class Settings:
    # --- service ---
    host: str = "127.0.0.1"  # loopback: see check_exposure for the rule on any other address
    port: int = 9090
    workers: int = 1
    threads: int = 8
    log_level: str = "INFO"
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    # --- SAM ---
    sam_model: str = ""  # empty: sam_huge_sa1b on GPU, sam_base_sa1b on CPU
    sam_device: str = "auto"  # auto, cpu, cuda, cuda:N
    sam_half: bool = False
    sam_trace_decoder: bool = True  # replay the decoder as a traced torch graph (ml_backend/sam/decoder.py)
    embedding_cache_mb: int = 1024
    # --- images ---
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    max_image_pixels: int = 100_000_000
    max_download_mb: int = 64
    download_timeout_s: float = 30.0
    allowed_hosts: tuple[str, ...] = ()
    local_files_document_root: str = ""
    image_cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "sam-trimap-backend" / "images")
    image_cache_mb: int = 2048
    # --- labels ---
    negative_labels: tuple[str, ...] = DEFAULT_NEGATIVE_LABELS
    brush_label: str = ""  # empty: the prompt's label when the mask tag has it, else its first label
    # --- trimap pre-annotation ---
    model_dir: Path = Path("models")
    trimap_include_boundary: bool = True
    trimap_sam_refine: bool = False
    # --- retraining ---
    redis_url: str = ""
    retrain_min_annotations: int = 10
    retrain_min_interval_min: float = 10.0
    retrain_schedule_min: float = 0.0  # 0: no fixed schedule
    retrain_ground_truth_only: bool = False
    retrain_epochs: int = 30
    retrain_image_size: int = 200
    retrain_batch_size: int = 16
    # Training pairs up to which a fit gets at least 150 steps and fits three starts (fine-tune, fresh decoder,
    # from scratch), keeping the best on the validation split (0: never; see training/selection.py).
    retrain_compare_max_train: int = 64
    retrain_job_timeout_s: int = 6 * 3600
    promotion_margin: float = 0.0
    boundary_width: int = 4
    foreground_labels: tuple[str, ...] = ()  # empty: every mask label that is not background/boundary
    background_labels: tuple[str, ...] = ("background",)
    boundary_labels: tuple[str, ...] = ("boundary", "border", "edge")
    # --- image input bounds (trust, issue 9) ---
    max_image_mb: int = 256  # decoded RGB bytes (width x height x 3), checked before decoding
    # --- serving reliability: image encodes at once per process, and how long a first click may queue ---
    encode_concurrency: int = 0  # 0: 1 on CPU, 2 on a GPU
    encode_queue_timeout_s: float = 45.0
    # --- mask result formats (mask-formats) ---
    mask_tag: str = ""  # empty: the image's first BrushLabels, else BitmaskLabels, else PolygonLabels
    polygon_min_area: int = 16  # pixels: smaller components are dropped and smaller holes filled
    polygon_tolerance: float = 1.0  # pixels: Douglas-Peucker simplification of polygon outlines
    # --- embedding store and pre-encoding (embedding-store) ---
    embedding_store_dir: Path = field(
        default_factory=lambda: Path.home() / ".cache" / "sam-trimap-backend" / "embeddings")
    embedding_store_mb: int = 8192  # 0: no store (embeddings live in one process's memory only)
    embedding_store_dtype: str = "float32"  # float16 halves the store; masks measured in the tests
    preencode: bool = True  # encode a project's images when it connects (needs a Label Studio token)
    preencode_lookahead: int = 3  # tasks after an opened one that jump the queue with it
    preencode_max_tasks: int = 5000  # tasks listed per project when it connects
    preencode_log_every: int = 10  # a progress line per project every N images
    preencode_executor: str = "local"  # local: a thread of each backend process; rq: RQ workers (REDIS_URL)
    url_key_ttl_s: float = 600.0  # an http(s) image is asked for again (if changed) after this long (files: mtime)
    # --- training that cannot run away; per-project models (training-projects) ---
    retrain_backoff_min: float = 5.0  # first retry after a failed training; doubles per failure
    retrain_backoff_max_min: float = 360.0
    retrain_concurrency: int = 1  # in-process fits at a time per backend process
    retrain_queue_max: int = 16  # in-process jobs waiting for a slot
    keep_versions: int = 10  # versions kept per store (0: all); current and its parent always stay
    base_model: str = ""  # a version directory or .keras file serving projects without their own model
    min_mask_area: int = 16  # a predicted mask with fewer pixels yields no region
    # --- SAM 3 concept pre-annotation (sam3) ---
    preannotate: str = "trimap"  # trimap, sam3, both; from_env: sam3 when SAM3_MODEL is set and this is not
    sam3_model: str = ""  # sam3_pcs, a keras-hub preset directory or a Hugging Face SAM 3 checkpoint directory
    sam3_device: str = "auto"
    sam3_half: bool = False
    sam3_score_threshold: float = 0.5
    sam3_dedup_iou: float = 0.7
    sam3_max_instances: int = 50
    sam3_phrases: tuple[tuple[str, str], ...] = ()  # (lower-case label, phrase)
    sam3_trimap_min_overlap: float = 0.5
    sam3_on_import: bool = True  # TASKS_CREATED queues the project's pre-annotation job
    sam3_on_connect: bool = True  # a project's first /setup in a process queues its pre-annotation job
    sam3_exemplar_labels: tuple[str, ...] = ()  # lower-case rectangle labels whose boxes are SAM 3 exemplars
    sam3_text_default_label: str = ""  # mask label of a typed phrase that names none (empty: such phrases refused)
    # --- prompt state per task (editor-prompts) ---
    prompt_state_mb: int = 64  # its previous low-resolution logits: 256 KiB per region for SAM
    prompt_state_entries: int = 1000  # tasks remembered at once
    prompt_state_ttl_s: float = 900.0  # forgotten this long after its last click
    # --- trust: who may call, what a request may hold (SECURITY.md) ---
    allow_unauthenticated: bool = False  # serve a non-loopback HOST without basic auth, deliberately
    backend_hostnames: tuple[str, ...] = ()  # Host names served besides loopback, HOST, IP literals (proxy, compose)
    max_request_mb: int = 32
    max_tasks_per_request: int = 100  # Label Studio's default ML batch size
    max_prompt_regions: int = 16  # rectangles (plus the keypoint group): one SAM decode each
    max_prompt_points: int = 64
    max_warmup_tasks: int = 1000
    # --- prompt state shared by the worker processes (shared-prompts) ---
    prompt_state_shared: str = "auto"  # auto: when WORKERS > 1; on; off (each process keeps its own)
    prompt_state_dir: str = ""  # empty: /dev/shm/sam-trimap-prompts-<MODEL_DIR's token>, else MODEL_DIR/prompt-state
    # --- operators' view: Prometheus metrics and the dashboard (ops) ---
    metrics_public: bool = False  # serve /metrics without credentials (a Prometheus on a private network)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        d = cls()
        settings = cls(
            host=_str(env, "HOST", d.host),
            port=_int(env, "PORT", d.port),
            workers=_int(env, "WORKERS", d.workers),
            threads=_int(env, "THREADS", d.threads),
            log_level=_str(env, "LOG_LEVEL", d.log_level).upper(),
            basic_auth_user=_str(env, "BASIC_AUTH_USER"),
            basic_auth_pass=_str(env, "BASIC_AUTH_PASS"),
            sam_model=_str(env, "SAM_MODEL"),
            sam_device=_str(env, "SAM_DEVICE", d.sam_device).lower(),
            sam_half=_bool(env, "SAM_HALF", d.sam_half),
            sam_trace_decoder=_bool(env, "SAM_TRACE_DECODER", d.sam_trace_decoder),
            embedding_cache_mb=_int(env, "EMBEDDING_CACHE_MB", d.embedding_cache_mb),
            label_studio_url=_str(env, "LABEL_STUDIO_URL").rstrip("/"),
            label_studio_api_key=_str(env, "LABEL_STUDIO_API_KEY"),
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", d.max_image_pixels),
            max_download_mb=_int(env, "MAX_DOWNLOAD_MB", d.max_download_mb),
            download_timeout_s=_float(env, "DOWNLOAD_TIMEOUT_S", d.download_timeout_s),
            allowed_hosts=tuple(h.lower() for h in _list(env, "ALLOWED_HOSTS", d.allowed_hosts)),
            local_files_document_root=_str(env, "LOCAL_FILES_DOCUMENT_ROOT"),
            image_cache_dir=Path(_str(env, "IMAGE_CACHE_DIR") or d.image_cache_dir),
            image_cache_mb=_int(env, "IMAGE_CACHE_MB", d.image_cache_mb),
            negative_labels=tuple(n.lower() for n in _list(env, "NEGATIVE_LABELS", d.negative_labels)),
            brush_label=_str(env, "BRUSH_LABEL"),
            model_dir=Path(_str(env, "MODEL_DIR") or d.model_dir),
            trimap_include_boundary=_bool(env, "TRIMAP_INCLUDE_BOUNDARY", d.trimap_include_boundary),
            trimap_sam_refine=_bool(env, "TRIMAP_SAM_REFINE", d.trimap_sam_refine),
            redis_url=_str(env, "REDIS_URL"),
            retrain_min_annotations=_int(env, "RETRAIN_MIN_ANNOTATIONS", d.retrain_min_annotations),
            retrain_min_interval_min=_float(env, "RETRAIN_MIN_INTERVAL_MIN", d.retrain_min_interval_min),
            retrain_schedule_min=_float(env, "RETRAIN_SCHEDULE_MIN", d.retrain_schedule_min),
            retrain_ground_truth_only=_bool(env, "RETRAIN_GROUND_TRUTH_ONLY", d.retrain_ground_truth_only),
            retrain_epochs=_int(env, "RETRAIN_EPOCHS", d.retrain_epochs),
            retrain_image_size=_int(env, "RETRAIN_IMAGE_SIZE", d.retrain_image_size),
            retrain_batch_size=_int(env, "RETRAIN_BATCH_SIZE", d.retrain_batch_size),
            retrain_compare_max_train=_int(env, "RETRAIN_COMPARE_MAX_TRAIN", d.retrain_compare_max_train),
            retrain_job_timeout_s=_int(env, "RETRAIN_JOB_TIMEOUT_S", d.retrain_job_timeout_s),
            promotion_margin=_float(env, "PROMOTION_MARGIN", d.promotion_margin),
            boundary_width=_int(env, "BOUNDARY_WIDTH", d.boundary_width),
            foreground_labels=tuple(n.lower() for n in _list(env, "FOREGROUND_LABELS", d.foreground_labels)),
            background_labels=tuple(n.lower() for n in _list(env, "BACKGROUND_LABELS", d.background_labels)),
            boundary_labels=tuple(n.lower() for n in _list(env, "BOUNDARY_LABELS", d.boundary_labels)),
            # image input bounds (trust, issue 9)
            max_image_mb=_int(env, "MAX_IMAGE_MB", d.max_image_mb),
            encode_concurrency=_int(env, "ENCODE_CONCURRENCY", d.encode_concurrency),
            encode_queue_timeout_s=_float(env, "ENCODE_QUEUE_TIMEOUT_S", d.encode_queue_timeout_s),
            mask_tag=_str(env, "MASK_TAG"),
            polygon_min_area=_int(env, "POLYGON_MIN_AREA", d.polygon_min_area),
            polygon_tolerance=_float(env, "POLYGON_TOLERANCE", d.polygon_tolerance),
            embedding_store_dir=Path(_str(env, "EMBEDDING_STORE_DIR") or d.embedding_store_dir),
            embedding_store_mb=_int(env, "EMBEDDING_STORE_MB", d.embedding_store_mb),
            embedding_store_dtype=_str(env, "EMBEDDING_STORE_DTYPE", d.embedding_store_dtype).lower(),
            preencode=_bool(env, "PREENCODE", d.preencode),
            preencode_lookahead=_int(env, "PREENCODE_LOOKAHEAD", d.preencode_lookahead),
            preencode_max_tasks=_int(env, "PREENCODE_MAX_TASKS", d.preencode_max_tasks),
            preencode_log_every=_int(env, "PREENCODE_LOG_EVERY", d.preencode_log_every),
            preencode_executor=_str(env, "PREENCODE_EXECUTOR", d.preencode_executor).lower(),
            url_key_ttl_s=_float(env, "URL_KEY_TTL_S", d.url_key_ttl_s),
            # --- training that cannot run away; per-project models (training-projects) ---
            retrain_backoff_min=_float(env, "RETRAIN_BACKOFF_MIN", d.retrain_backoff_min),
            retrain_backoff_max_min=_float(env, "RETRAIN_BACKOFF_MAX_MIN", d.retrain_backoff_max_min),
            retrain_concurrency=_int(env, "RETRAIN_CONCURRENCY", d.retrain_concurrency),
            retrain_queue_max=_int(env, "RETRAIN_QUEUE_MAX", d.retrain_queue_max),
            keep_versions=_int(env, "KEEP_VERSIONS", d.keep_versions),
            base_model=_str(env, "BASE_MODEL"),
            min_mask_area=_int(env, "MIN_MASK_AREA", d.min_mask_area),
            # SAM 3 concept pre-annotation (sam3)
            preannotate=(_str(env, "PREANNOTATE") or ("sam3" if _str(env, "SAM3_MODEL") else d.preannotate)).lower(),
            sam3_model=_str(env, "SAM3_MODEL"),
            sam3_device=_str(env, "SAM3_DEVICE", d.sam3_device).lower(),
            sam3_half=_bool(env, "SAM3_HALF", d.sam3_half),
            sam3_score_threshold=_float(env, "SAM3_SCORE_THRESHOLD", d.sam3_score_threshold),
            sam3_dedup_iou=_float(env, "SAM3_DEDUP_IOU", d.sam3_dedup_iou),
            sam3_max_instances=_int(env, "SAM3_MAX_INSTANCES", d.sam3_max_instances),
            sam3_phrases=_phrases(env, "SAM3_PHRASES"),
            sam3_trimap_min_overlap=_float(env, "SAM3_TRIMAP_MIN_OVERLAP", d.sam3_trimap_min_overlap),
            sam3_on_import=_bool(env, "SAM3_ON_IMPORT", d.sam3_on_import),
            sam3_on_connect=_bool(env, "SAM3_ON_CONNECT", d.sam3_on_connect),
            sam3_exemplar_labels=tuple(n.lower() for n in _list(env, "SAM3_EXEMPLAR_LABELS", d.sam3_exemplar_labels)),
            sam3_text_default_label=_str(env, "SAM3_TEXT_DEFAULT_LABEL", d.sam3_text_default_label),
            prompt_state_mb=_int(env, "PROMPT_STATE_MB", d.prompt_state_mb),
            prompt_state_entries=_int(env, "PROMPT_STATE_ENTRIES", d.prompt_state_entries),
            prompt_state_ttl_s=_float(env, "PROMPT_STATE_TTL_S", d.prompt_state_ttl_s),
            allow_unauthenticated=_bool(env, "ALLOW_UNAUTHENTICATED", d.allow_unauthenticated),
            backend_hostnames=tuple(n.lower() for n in _list(env, "BACKEND_HOSTNAMES", d.backend_hostnames)),
            max_request_mb=_int(env, "MAX_REQUEST_MB", d.max_request_mb),
            max_tasks_per_request=_int(env, "MAX_TASKS_PER_REQUEST", d.max_tasks_per_request),
            max_prompt_regions=_int(env, "MAX_PROMPT_REGIONS", d.max_prompt_regions),
            max_prompt_points=_int(env, "MAX_PROMPT_POINTS", d.max_prompt_points),
            max_warmup_tasks=_int(env, "MAX_WARMUP_TASKS", d.max_warmup_tasks),
            # prompt state shared by the worker processes (shared-prompts)
            prompt_state_shared=_str(env, "PROMPT_STATE_SHARED", d.prompt_state_shared).lower(),
            prompt_state_dir=_str(env, "PROMPT_STATE_DIR"),
            metrics_public=_bool(env, "METRICS_PUBLIC", d.metrics_public),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Reject values that are well-formed but meaningless."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise SettingsError(f"{f.name.upper()} must not be negative (got {value})")
        if self.retrain_image_size % 8:
            raise SettingsError(f"RETRAIN_IMAGE_SIZE must be a multiple of 8 (got {self.retrain_image_size})")
        if self.retrain_concurrency < 1:
            raise SettingsError(f"RETRAIN_CONCURRENCY must be at least 1 (got {self.retrain_concurrency})")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise SettingsError("Set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.embedding_store_dtype not in ("float32", "float16"):
            raise SettingsError(f"EMBEDDING_STORE_DTYPE must be float32 or float16 (got {self.embedding_store_dtype!r})")
        if self.preencode_executor not in ("local", "rq"):
            raise SettingsError(f"PREENCODE_EXECUTOR must be local or rq (got {self.preencode_executor!r})")
        if self.preencode_executor == "rq" and not self.redis_url:
            raise SettingsError("PREENCODE_EXECUTOR=rq needs REDIS_URL")
        if self.preannotate not in ("trimap", "sam3", "both"):
            raise SettingsError(f"PREANNOTATE must be trimap, sam3 or both (got {self.preannotate!r})")
        if self.preannotate != "trimap" and not self.sam3_model:
            raise SettingsError(f"PREANNOTATE={self.preannotate} needs SAM3_MODEL (sam3_pcs or a local directory)")
        if self.sam3_exemplar_labels and not self.sam3_model:
            raise SettingsError("SAM3_EXEMPLAR_LABELS needs SAM3_MODEL (sam3_pcs or a local directory)")
        for name in ("sam3_score_threshold", "sam3_dedup_iou", "sam3_trimap_min_overlap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SettingsError(f"{name.upper()} must be between 0 and 1 (got {getattr(self, name)})")
        if self.sam3_max_instances < 1:
            raise SettingsError("SAM3_MAX_INSTANCES must be at least 1")
        if self.prompt_state_shared not in ("auto", "on", "off"):
            raise SettingsError(f"PROMPT_STATE_SHARED must be auto, on or off (got {self.prompt_state_shared!r})")
        for name in ("max_request_mb", "max_tasks_per_request", "max_prompt_regions", "max_prompt_points",
                     "max_warmup_tasks"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name.upper()} must be at least 1")

    @property
    def embedding_cache_bytes(self) -> int:
        return self.embedding_cache_mb * 1024 * 1024

    @property
    def embedding_store_bytes(self) -> int:
        return self.embedding_store_mb * 1024 * 1024

    @property
    def max_image_bytes(self) -> int:
        return self.max_image_mb * 1024 * 1024

    @property
    def basic_auth(self) -> bool:
        """Whether callers must authenticate (HTTP basic auth) on every route but ``/health``."""
        return bool(self.basic_auth_user)

    @property
    def max_download_bytes(self) -> int:
        return self.max_download_mb * 1024 * 1024


# What each setting means, for people: docs/configuration.md is generated from these, the fields' names
# and their defaults (python -m ml_backend.settings_reference; tests/test_settings_reference.py fails when
# the page is stale or a field has no meaning here).
MEANINGS: dict[str, str] = {
    "host": "where gunicorn listens; any non-loopback `HOST` needs basic auth or `ALLOW_UNAUTHENTICATED=true`",
    "port": "the port gunicorn listens on",
    "workers": "gunicorn worker processes (each process holds its own SAM, embedding cache and encode slots)",
    "threads": "threads per gunicorn worker",
    "log_level": "logging level",
    "basic_auth_user": "with `BASIC_AUTH_PASS`: when set, every route but `/health` and `/ready` needs HTTP basic auth "
                       "(`/webhook` also takes the webhook secret)",
    "basic_auth_pass": "the password of `BASIC_AUTH_USER` (set both or neither)",
    "sam_model": "empty: `sam_huge_sa1b` on GPU, `sam_base_sa1b` on CPU. A keras-hub preset name (`sam_base_sa1b`, "
                 "`sam_large_sa1b`, `sam_huge_sa1b`), a local preset directory, or an official SAM checkpoint "
                 "(`.pth`, converted once into `MODEL_DIR/sam-presets/`)",
    "sam_device": "`auto` (GPU when torch sees one), `cpu`, `cuda`, `cuda:N`",
    "sam_half": "half precision on GPU",
    "sam_trace_decoder": "run SAM's prompt encoder + mask decoder as a traced torch graph (same outputs, ~3× less "
                         "Python overhead per click); `false` runs the Keras layers eagerly",
    "embedding_cache_mb": "size of the image-embedding cache in memory (LRU by bytes; a base/huge embedding is 4 MiB)",
    "label_studio_url": "Label Studio's address for images; default: what `/setup` sends (from an authenticated "
                        "caller only). The token goes only to this origin's media paths "
                        "(see [Image sources](image-sources.md))",
    "label_studio_api_key": "Label Studio's token (legacy `Token` key or personal access token) for images; "
                            "default: what `/setup` sends (from an authenticated caller only)",
    "max_image_pixels": "larger images are refused (decompression bombs); also bounds every declared mask size",
    "max_download_mb": "download size cap (also the largest `data:` URI)",
    "download_timeout_s": "download timeout in seconds",
    "allowed_hosts": "other hosts images may be downloaded from, without the token (`host` or `*.domain`, "
                     "comma-separated); listed hosts may have private addresses",
    "local_files_document_root": "Label Studio's local-files root, read directly from disk when set (a task only "
                                 "inside its project's local storages)",
    "image_cache_dir": "the on-disk download cache (LRU by bytes)",
    "image_cache_mb": "size of the download cache",
    "negative_labels": "keypoint labels that mean \"not this object\" (comma-separated, case-insensitive)",
    "brush_label": "force every mask under this label of the mask tag (empty: the prompt's label when the mask tag "
                   "has it, else its first label)",
    "model_dir": "the trimap model stores (shared by backend and workers), converted SAM presets, the SAM 3 job "
                 "list and the retraining state",
    "trimap_include_boundary": "pre-annotation mask = foreground + boundary classes",
    "trimap_sam_refine": "prompt SAM with the trimap foreground's box to refine the edge",
    "redis_url": "run training jobs and SAM 3 project pre-annotation jobs on RQ workers through this Redis "
                 "instead of in-process (also needed by `PREENCODE_EXECUTOR=rq`); replicas also share the prompt "
                 "state, the URL index and the encode locks there (see [Replicas](replicas.md))",
    "retrain_min_annotations": "accepted annotations since the last version before training starts",
    "retrain_min_interval_min": "minutes between trainings of a project",
    "retrain_schedule_min": "also train on a fixed schedule (minutes; 0 = off)",
    "retrain_ground_truth_only": "train only on annotations marked ground truth",
    "retrain_epochs": "fine-tuning epochs",
    "retrain_image_size": "fine-tuning image size in pixels (a multiple of 8)",
    "retrain_batch_size": "fine-tuning batch size",
    "retrain_compare_max_train": "training images up to which a fit follows the small-data rule (a minimum step "
                                 "budget and the better of several starts; see [First annotations]"
                                 "(first-annotations.md)); 0: never",
    "retrain_job_timeout_s": "a training job is stopped and recorded as failed after this long (RQ's job timeout; "
                             "in-process, the fit stops at its next batch)",
    "promotion_margin": "a new version must beat the current foreground IoU by this much",
    "boundary_width": "width in pixels of the boundary band drawn around painted foreground",
    "foreground_labels": "mask labels mapped to the trimap's foreground (empty: every mask label that is not "
                         "background or boundary)",
    "background_labels": "mask labels mapped to the trimap's background",
    "boundary_labels": "mask labels mapped to the trimap's boundary",
    "max_image_mb": "images whose decoded RGB (width × height × 3 bytes) is larger are refused, from the header, "
                    "before decoding",
    "encode_concurrency": "0: auto (1 on CPU, 2 on a GPU). Image encodes (SAM's expensive step, a first click on "
                          "an image) running at once per worker process; further first clicks queue, interactive "
                          "ones before warm-up/background encodes",
    "encode_queue_timeout_s": "longest a first click may expect to wait for an encode slot; one that would wait "
                              "longer (estimated from the encodes measured so far) gets 503 with `Retry-After` at "
                              "once. One admitted is served while its answer still fits in Label Studio's 100 s. "
                              "Further clicks on an encoded image never queue",
    "mask_tag": "name of the mask tag that receives masks when the image has several (empty: `BrushLabels`, else "
                "`BitmaskLabels`, else `PolygonLabels`)",
    "polygon_min_area": "pixels: smaller components get no polygon and smaller holes are filled",
    "polygon_tolerance": "pixels: Douglas–Peucker simplification of polygon outlines (0 keeps every corner of the "
                         "pixel outline)",
    "embedding_store_dir": "on-disk image embeddings shared by workers, restarts and replicas (per model identity)",
    "embedding_store_mb": "size of the embedding store (LRU by bytes; a base/huge embedding is 4 MiB in float32); "
                          "`0` disables it",
    "embedding_store_dtype": "`float32` or `float16` (halves the store; masks barely change, see "
                             "[Deployment](deployment.md#pre-encoding-and-the-embedding-store))",
    "preencode": "encode a project's images when it connects, new tasks as they are created, opened tasks and "
                 "their look-ahead first (needs a Label Studio token)",
    "preencode_lookahead": "tasks after an opened one that jump the queue with it",
    "preencode_max_tasks": "tasks listed per project when it connects",
    "preencode_log_every": "a progress line per project every N images",
    "preencode_executor": "`local`: a thread in each backend process; `rq`: jobs on the `sam-embeddings` queue "
                          "for `python -m ml_backend.embeddings.worker` (needs `REDIS_URL`)",
    "url_key_ttl_s": "how long a click trusts an `http(s)` image URL to still hold the same pixels (local files: "
                     "checked by mtime and size on every click)",
    "retrain_backoff_min": "after a failed training the next automatic attempt waits this long (minutes), "
                           "doubling per consecutive failure up to `RETRAIN_BACKOFF_MAX_MIN`",
    "retrain_backoff_max_min": "the longest back-off after failed trainings (minutes)",
    "retrain_concurrency": "in-process training (no `REDIS_URL`): fits at once per backend process",
    "retrain_queue_max": "in-process training: jobs waiting for a slot (more are refused and recorded as failed)",
    "keep_versions": "versions kept per project store after each training (`0`: all); the current version and its "
                     "parent are never removed",
    "base_model": "a trimap version directory or `.keras` file serving projects without a model of their own, and "
                  "what their first fine-tuning starts from (empty: an older single store in `MODEL_DIR`, if any, "
                  "else from scratch)",
    "min_mask_area": "a pre-annotation mask with fewer pixels gives no region",
    "preannotate": "what batch predictions (Retrieve Predictions, project jobs) use: `trimap`, `sam3` or `both`; "
                   "`sam3` when `SAM3_MODEL` is set and this is not (see [SAM 3](sam3.md))",
    "sam3_model": "`sam3_pcs` (keras-hub preset, downloaded from Kaggle), a local keras-hub preset directory, or a "
                  "Hugging Face SAM 3 checkpoint directory (`config.json` of model type `sam3_video`, safetensors, "
                  "tokenizer files, as `facebook/sam3` publishes)",
    "sam3_device": "SAM 3's device: `auto` (GPU when torch sees one), `cpu`, `cuda`, `cuda:N`",
    "sam3_half": "SAM 3 in float16 on GPU",
    "sam3_score_threshold": "an instance becomes a region when its score (query score × presence score) is above "
                            "this",
    "sam3_dedup_iou": "two masks (any labels) overlapping with a higher IoU are one object: the higher score keeps "
                      "it",
    "sam3_max_instances": "regions per image at most, best first",
    "sam3_phrases": "phrases for labels that are not good ones, `Label=phrase;Label=phrase` (e.g. "
                    "`Cat=tabby cat;Car=car`)",
    "sam3_trimap_min_overlap": "with `PREANNOTATE=both`, the share of an instance's area that must lie in the "
                               "trimap foreground",
    "sam3_on_import": "with SAM 3 on, Label Studio's `TASKS_CREATED` webhook (an import) queues the project's "
                      "pre-annotation job",
    "sam3_exemplar_labels": "rectangle labels whose smart rectangles are SAM 3 exemplars (every similar instance "
                            "comes back; comma-separated, case-insensitive; needs `SAM3_MODEL`)",
    "prompt_state_mb": "memory for the logits of the objects being segmented (256 KiB per region for SAM)",
    "prompt_state_entries": "tasks whose object being segmented is remembered at once",
    "prompt_state_ttl_s": "seconds an object being segmented is remembered after its last click",
    "allow_unauthenticated": "serve a non-loopback `HOST` without basic auth, on purpose",
    "backend_hostnames": "host names the backend is reached by besides loopback names, `HOST` and IP literals (a "
                         "proxy's name, the compose alias `backend.internal`); any other `Host` header is refused "
                         "with 421 before any work (DNS rebinding)",
    "max_request_mb": "largest body of `/predict`, `/webhook` and `/warmup` (413 beyond; every other route takes "
                      "1 MB), and the most request bytes a process parses at once",
    "max_tasks_per_request": "tasks per `/predict` (Label Studio's default ML batch size)",
    "max_prompt_regions": "rectangles per interactive request (plus the keypoint group: one SAM decode each)",
    "max_prompt_points": "keypoints per interactive request",
    "max_warmup_tasks": "most tasks one `/warmup` may embed",
    "prompt_state_shared": "keep the prompt state in files every worker process of the backend shares: `auto` "
                           "when `WORKERS` > 1, `on`, `off` (each process its own memory); see "
                           "[Deployment](deployment.md#several-worker-processes). With `REDIS_URL` set it is kept "
                           "in Redis for every replica instead, unless `off`",
    "prompt_state_dir": "the folder of those files; empty: `/dev/shm/sam-trimap-prompts-<hash of MODEL_DIR>` when "
                        "`/dev/shm` has room for twice `PROMPT_STATE_MB`, else `MODEL_DIR/prompt-state`",
    "metrics_public": "serve `/metrics` (Prometheus text) without credentials, for a Prometheus on a private network; "
                      "every other route keeps its authentication",
    "sam3_on_connect": "with SAM 3 pre-annotation: a project's first `/setup` in a process (connecting it in Label "
                       "Studio) queues a SAM 3 job for its tasks without a prediction from the current model version",
    "sam3_text_default_label": "the mask label for a typed phrase (a `<TextArea>` in the labeling config) that names no "
                               "label; empty: such phrases are refused with a message",
}
