"""All configuration, read once from the environment.

Every variable is documented in the README's settings table; nothing else in the
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
    # Training pairs up to which a fit gets at least 60 steps and also tries from scratch beside fine-tuning,
    # keeping the better start by 2-fold cross-validation (0: never; see training/selection.py).
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
    url_key_ttl_s: float = 600.0  # an http(s) image URL is re-read after this long (local files: by mtime/size)
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
    sam3_exemplar_labels: tuple[str, ...] = ()  # lower-case rectangle labels whose boxes are SAM 3 exemplars
    # --- prompt state per task (editor-prompts) ---
    prompt_state_mb: int = 64  # its previous low-resolution logits: 256 KiB per region for SAM
    prompt_state_entries: int = 1000  # tasks remembered at once
    prompt_state_ttl_s: float = 900.0  # forgotten this long after its last click
    # --- trust: who may call, what a request may hold (SECURITY.md) ---
    allow_unauthenticated: bool = False  # serve a non-loopback HOST without basic auth, deliberately
    webhook_secret: str = ""  # empty: derived from BASIC_AUTH_USER/BASIC_AUTH_PASS
    max_request_mb: int = 32
    max_tasks_per_request: int = 100  # Label Studio's default ML batch size
    max_prompt_regions: int = 16  # rectangles (plus the keypoint group): one SAM decode each
    max_prompt_points: int = 64
    max_warmup_tasks: int = 1000
    # --- prompt state shared by the worker processes (shared-prompts) ---
    prompt_state_shared: str = "auto"  # auto: when WORKERS > 1; on; off (each process keeps its own)
    prompt_state_dir: str = ""  # empty: /dev/shm/sam-trimap-prompts-<hash of MODEL_DIR>, else MODEL_DIR/prompt-state

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
            sam3_exemplar_labels=tuple(n.lower() for n in _list(env, "SAM3_EXEMPLAR_LABELS", d.sam3_exemplar_labels)),
            prompt_state_mb=_int(env, "PROMPT_STATE_MB", d.prompt_state_mb),
            prompt_state_entries=_int(env, "PROMPT_STATE_ENTRIES", d.prompt_state_entries),
            prompt_state_ttl_s=_float(env, "PROMPT_STATE_TTL_S", d.prompt_state_ttl_s),
            allow_unauthenticated=_bool(env, "ALLOW_UNAUTHENTICATED", d.allow_unauthenticated),
            webhook_secret=_str(env, "WEBHOOK_SECRET"),
            max_request_mb=_int(env, "MAX_REQUEST_MB", d.max_request_mb),
            max_tasks_per_request=_int(env, "MAX_TASKS_PER_REQUEST", d.max_tasks_per_request),
            max_prompt_regions=_int(env, "MAX_PROMPT_REGIONS", d.max_prompt_regions),
            max_prompt_points=_int(env, "MAX_PROMPT_POINTS", d.max_prompt_points),
            max_warmup_tasks=_int(env, "MAX_WARMUP_TASKS", d.max_warmup_tasks),
            # prompt state shared by the worker processes (shared-prompts)
            prompt_state_shared=_str(env, "PROMPT_STATE_SHARED", d.prompt_state_shared).lower(),
            prompt_state_dir=_str(env, "PROMPT_STATE_DIR"),
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
