"""Run configuration: one pydantic model per stage, gathered in ``RunConfig``.

Resolution order: defaults < YAML file (``--config``) < command-line overrides. The resolved
config is saved as ``RUN_DIR/config.yaml`` so that a stage rerun with ``--config
RUN_DIR/config.yaml`` reproduces the run. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import LprError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which checkpoint to load and how."""

    path: str = "demo"  # local directory, hub id, or "demo" (the built-in demo model, built if not cached)
    revision: str | None = None  # hub branch, tag or commit; recorded in the states store
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: float32 on CPU, checkpoint dtype on GPU
    device: str = "auto"  # auto: cuda when available, else cpu; ignored when device_map is set
    device_map: str | None = None  # e.g. "auto" to spread a model larger than one GPU (needs accelerate)
    trust_remote_code: bool = False  # run the checkpoint's own Python code; off unless you trust it


class CorpusConfig(_Section):
    """Where the text comes from and how it is cut into model inputs."""

    # "demo" (or one kind of it: "demo:topic", "demo:doc", "demo:code"), a file, a folder, a URL, a saved
    # datasets dataset, or "hf:NAME"
    source: str = "demo"
    format: Literal["auto", "demo", "text", "jsonl", "parquet", "datasets"] = "auto"
    text_field: str = "text"  # JSONL field / Parquet or dataset column holding the text
    # a folder: read only files with these extensions (".py", ".txt"; "" for none); null: every file that is text
    suffixes: list[str] | None = None
    include: list[str] | None = None  # a folder: read only these files (paths relative to it); null: all

    @model_validator(mode="after")
    def _suffixes_are_extensions(self) -> CorpusConfig:
        bad = [s for s in self.suffixes or [] if s and not (s.startswith(".") and "/" not in s)]
        if bad:
            raise ValueError(f"corpus.suffixes {bad} are not file extensions: write them as '.py' ('' for none)")
        return self

    heldout_fraction: float = Field(0.1, gt=0, lt=1)  # documents kept out of dump/distill for validation
    seq_len: int = Field(256, ge=8)  # tokens per packed sequence
    # size of the demo corpus in characters when source is "demo"; null: all of it (a few thousand documents,
    # so that validation measures a few hundred held-out ones)
    demo_max_chars: int | None = Field(None, ge=1_000)


class DumpConfig(_Section):
    """The dump stage: router inputs and decisions → ``states.zarr``."""

    max_tokens: int | None = Field(262_144, ge=1)  # token budget over the train split; null = all of it
    batch_tokens: int = Field(8_192, ge=8)  # tokens per forward pass (batch = batch_tokens // seq_len)
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # storage dtype of x
    chunk_rows: int | None = Field(None, ge=1)  # rows per Zarr chunk; null: batch_tokens, so each batch
    # fills whole chunks (no read-modify-write of a half-written chunk)
    codec: Literal["none", "lz4", "zstd"] = "none"  # activations barely compress: none writes fastest
    shards: int = Field(1, ge=1)  # >1: `dump --shard I/N` workers each write a slice, `dump` merges them
    # (the store is the same row for row for any N, so N is not part of the dump's fingerprint)


class ClusterConfig(_Section):
    """The cluster stage: a PCA latent basis and exactly balanced k-means per MoE layer → ``prototypes/``."""

    latent_dim: int | None = Field(None, ge=1)  # PCA components kept (≤ the hidden size); null: min(64, hidden)
    sample_rows: int = Field(262_144, ge=2)  # rows clustered per layer, drawn as whole chunks; memory ∝ this
    pca_rows: int = Field(65_536, ge=2)  # of those, rows the PCA covariance is accumulated over
    block_rows: int = Field(16_384, ge=1)  # rows read and projected at a time
    iterations: int = Field(25, ge=1)  # Lloyd iterations (plus one final exact assignment)
    # the Lloyd iterations run on this many sampled rows per expert (FAISS's default), the final exact assignment
    # on all of them; null: every iteration on the whole sample (at 128 experts, top-8: 4-5x slower, same MSE)
    fit_rows_per_expert: int | None = Field(256, ge=1)
    assign_k: int | None = Field(None, ge=1)  # clusters per token; null: the model's top-k (balanced slots)
    tol: float = Field(1e-4, gt=0, lt=1)  # final assignment within this relative cost of the optimum


class RouterConfig(_Section):
    """The Latent Prototype Router built from the prototypes (and later distilled)."""

    # "lpr": the Latent Prototype Router (load_lpr_model); "native": only the family's own router tensors are
    # distilled, so `export --checkpoint` writes a drop-in checkpoint; starts from the gates (docs/method.md)
    form: Literal["lpr", "native"] = "lpr"
    # where distillation starts: "clusters" (the LPR of the paper: PCA encoder, balanced centroids, then the
    # gate-level phase) or "gate" (the model's own gate as a compact dot-product LPR, distilled in the model
    # only; `similarity` applies to cluster-initialised routers and LPR-init). Compared in docs/results.md.
    init: Literal["clusters", "gate"] = "clusters"
    similarity: Literal["cosine", "dot", "gaussian", "mahalanobis"] = "cosine"
    calibration_rows: int = Field(262_144, ge=16)  # rows (whole chunks, many documents) for bias and temperature;
    # more rows → more documents → a bias that holds better on unseen text (memory ∝ rows × (latent + experts))

    @model_validator(mode="before")
    @classmethod
    def _native_starts_from_the_gates(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("form") == "native":
            if data.get("init", "gate") != "gate":
                raise ValueError(
                    f"router.form=native distils the model's own gates, not router.init={data['init']}: choose one "
                    "(drop router.init, or set router.form=lpr)"
                )
            return data | {"init": "gate"}
        return data


class DistillConfig(_Section):
    """Gate-level distillation of each layer's LPR router on the stored states."""

    # the one fidelity/balance knob, both phases: 0 imitates the teacher, 1 only balances
    # (gate level: target = (1 − b)·teacher + b·its balanced projection; model level: (1 − b)·KL + b·balance)
    balance: float = Field(0.5, ge=0, le=1)
    steps: int = Field(600, ge=1)
    batch_rows: int = Field(4096, ge=16)
    buffer_rows: int = Field(65_536, ge=16)  # rows read and shuffled together (memory ∝ this)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    sinkhorn_iterations: int = Field(30, ge=1)
    diversity: float = Field(0.0, ge=0)  # weight of the prototype-orthogonality term; 0 turns it off
    heldout_share: float = Field(0.05, gt=0, lt=1)  # chunks kept out of training for early stopping
    val_rows: int = Field(16_384, ge=16)
    eval_every: int = Field(50, ge=1)
    # model-level phase (the whole model, routers trainable, KL to the original model's next-token
    # distribution + per-sequence balance); token budget = model_steps · model_batch_sequences · corpus.seq_len
    model_steps: int = Field(150, ge=0)  # 0 turns the model-level phase off
    model_batch_sequences: int = Field(8, ge=1)
    model_lr: float = Field(2e-3, gt=0)
    model_candidates: int = Field(2, ge=0)  # runner-up experts per token given straight-through weights
    # weight of the data's own next-token loss in the fidelity term, beside the KL (0: KL only)
    model_data_ce: float = Field(0.0, ge=0, le=1)
    model_val_sequences: int = Field(32, ge=1)  # training-side sequences kept out for early stopping
    model_eval_every: int = Field(50, ge=1)
    # the routers train with their choice bias calibrated in the model every this many steps (0: trained
    # without a bias, calibrated once at the end), so the fidelity term sees the balanced routing it will have
    model_calibrate_every: int = Field(25, ge=0)
    model_calibration_sequences: int = Field(64, ge=1)  # the first this many calibration sequences, while training
    # the final choice-bias calibration in the model (training-side documents, never the held-out ones); the
    # bias balances these exactly, so their own document mix is what it imprints on unseen text: more
    # sequences (more documents) give a bias that holds better on held-out text (docs/method.md)
    calibration_sequences: int = Field(2048, ge=1)


class ValidateConfig(_Section):
    """The validate stage: every routing variant in the same model, on held-out documents → ``report/``."""

    variants: list[str] = ["original", "original+bias", "lpr-init", "lpr"]  # names in pipeline/variants.py
    sequences: int = Field(2048, ge=1)  # held-out sequences of corpus.seq_len tokens for loss and load (at most)
    batch_size: int = Field(16, ge=1)  # sequences per forward pass (also the batch that overflow is counted on)
    capacity_factors: list[float] = [1.0, 1.25]  # expert capacity as a multiple of the mean load (overflow)
    devices: list[int] = [2, 4, 8]  # expert-parallel device counts (balancedness)
    idle_fraction: float = Field(0.01, ge=0, lt=1)  # an expert below this share of a fair load counts as idle
    bias_strengths: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]  # original+bias swept over its strength
    tasks: list[str] = ["lpr_demo_cloze"]  # lm-eval tasks by name (the shipped local task, hellaswag, …); [] skips
    task_limit: int | None = Field(None, ge=1)  # documents per lm-eval task; null: all
    eval_batch_size: int = Field(32, ge=1)  # lm-eval batch size
    max_gini: float = Field(0.1, gt=0, le=1)  # winner: lowest held-out loss among variants with mean Gini ≤ this
    sweep_balance: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]  # `lpr-distill sweep`: distill.balance settings
    # traffic slices measured apart: name → a corpus source (its held-out documents, split like the corpus);
    # empty: for the demo corpus its document kinds (topics, docstrings, code), else none
    slices: dict[str, str] = {}
    slice_sequences: int = Field(256, ge=1)  # held-out sequences per slice (at most)
    # a slice whose document noise floor (the Gini a balanced router would still show on its documents) is
    # above this is too small to say anything: the report says so instead of giving its figures
    slice_max_floor: float = Field(0.1, gt=0, le=1)
    checkpoint: str | None = None  # an `export --checkpoint` directory, measured as one more variant, "checkpoint"


class DemoConfig(_Section):
    """The built-in demo model: a small Qwen3-MoE (or DeepSeek-V3-style) MoE trained on the demo corpus on a CPU."""

    family: Literal["qwen3_moe", "deepseek_v3"] = "qwen3_moe"  # deepseek_v3: sigmoid router with a choice bias
    variant: Literal["balanced", "collapsed"] = "balanced"  # collapsed: no balancing loss (stress case)
    hidden_size: int = Field(256, ge=16)
    num_layers: int = Field(4, ge=1)
    num_experts: int = Field(16, ge=2)
    top_k: int = Field(2, ge=1)
    expert_width: int = Field(256, ge=8)  # moe_intermediate_size
    num_heads: int = Field(4, ge=1)
    vocab_size: int = Field(4096, ge=300)  # byte-level BPE trained on the demo corpus
    corpus_chars: int = Field(6_000_000, ge=10_000)  # demo corpus size used for training
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(16, ge=1)  # sequences per training step
    train_steps: int = Field(360, ge=1)
    lr: float = Field(2e-3, gt=0)
    balance_coef: float = Field(5e-3, ge=0)  # per-layer Switch loss weight from mid-training on (weak on purpose)
    # weight at step 0, linearly down to balance_coef by mid-training: every expert is trained early, then the
    # routing drifts uneven, as in production checkpoints
    balance_coef_start: float = Field(2e-2, ge=0)
    eval_sequences: int = Field(128, ge=1)  # held-out sequences for the build report
    cache_dir: str | None = None  # default: $LPR_DISTILL_CACHE or ~/.cache/lpr-distill

    @model_validator(mode="after")
    def _check(self) -> DemoConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"demo.top_k={self.top_k} should be ≤ demo.num_experts={self.num_experts}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"demo.hidden_size={self.hidden_size} should be a multiple of demo.num_heads")
        grouped = self.num_experts % 4 == 0 and self.num_experts >= 8 and self.top_k * 2 <= self.num_experts
        if self.family == "deepseek_v3" and not grouped:  # top-k in 2 of 4 groups, a group's best two ranking it
            raise ValueError(
                f"deepseek_v3 demo: demo.num_experts={self.num_experts} not a multiple of 4, ≥ 8, ≥ 2 × top_k"
            )
        return self


class FlowConfig(_Section):
    """The orchestrated run (``flows/``, `lpr-distill serve`/`deploy`): where per-layer tasks run, retries.
    No stage's fingerprint covers this section: where work runs never changes what it produces."""

    task_runner: Literal["threads", "dask"] = "threads"  # dask: needs the `dask` extra
    max_workers: int = Field(1, ge=1)  # threads: per-layer tasks at once (1: one after the other)
    dask_address: str | None = None  # an existing Dask scheduler, e.g. tcp://10.0.0.5:8786; null: a LocalCluster
    dask_workers: int = Field(2, ge=1)  # LocalCluster worker processes (one per-layer task each at a time)
    retries: int = Field(2, ge=0)  # retries of tasks that touch storage (the run directory, the states store)
    retry_delay_seconds: float = Field(10.0, ge=0)


class RecalibrateConfig(_Section):
    """`lpr-distill recalibrate`: the stored routers' choice bias recalibrated on a traffic sample, as a
    new version of the routers, published when it is better on that traffic's held-out documents."""

    sequences: int = Field(512, ge=1)  # training-side traffic sequences the bias is calibrated on (at most)
    # fewer full training-side sequences than this in the traffic is an error: a bias fitted to a handful of
    # sequences follows them, not the traffic
    min_sequences: int = Field(64, ge=1)
    heldout_sequences: int = Field(256, ge=1)  # held-out traffic sequences that judge the new version (at most)
    publish: Literal["better", "always", "never"] = "better"  # better: see the two thresholds below
    min_gini_gain: float = Field(0.005, ge=0)  # better = held-out slot Gini lower by at least this ...
    max_ce_increase_pct: float = Field(1.0, ge=0)  # ... and held-out cross-entropy higher by at most this (%)


# The ``validate`` section is named after its stage; it shadows pydantic's deprecated ``BaseModel.validate``.
warnings.filterwarnings("ignore", message='Field name "validate" in "RunConfig" shadows', category=UserWarning)


class RunConfig(_Section):
    """Everything one run needs; each stage reads its own section."""

    seed: int = 0
    model: ModelConfig = ModelConfig()
    corpus: CorpusConfig = CorpusConfig()
    dump: DumpConfig = DumpConfig()
    cluster: ClusterConfig = ClusterConfig()
    router: RouterConfig = RouterConfig()
    distill: DistillConfig = DistillConfig()
    validate: ValidateConfig = ValidateConfig()
    recalibrate: RecalibrateConfig = RecalibrateConfig()
    demo: DemoConfig = DemoConfig()
    flow: FlowConfig = FlowConfig()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        dump, cluster = self.dump, self.cluster
        if dump.batch_tokens < self.corpus.seq_len:
            raise ValueError(f"dump.batch_tokens={dump.batch_tokens} should be ≥ corpus.seq_len={self.corpus.seq_len}")
        if cluster.pca_rows > cluster.sample_rows:
            raise ValueError(f"cluster.pca_rows={cluster.pca_rows} should be ≤ its sample_rows={cluster.sample_rows}")
        return self

    def section(self, *names: str) -> dict[str, Any]:
        """The named sections as plain data (what a stage's fingerprint covers)."""
        return {name: getattr(self, name).model_dump(mode="json") for name in names}


def _format_errors(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        elif e["type"] in ("value_error", "assertion_error"):
            problems.append(str(e["ctx"]["error"]) if "ctx" in e else e["msg"])
        else:
            problems.append(f"'{key}': {e['msg'].lower()} (got {e.get('input')!r})")
    return "; ".join(problems)


def build_config(data: dict[str, Any], *, origin: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise LprError(
            f"{origin}: {_format_errors(err)}", "fix the key or value (see `lpr-distill config show`)"
        ) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"dump.max_tokens=1000"`` → (["dump", "max_tokens"], 1000); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise LprError(f"override '{text}' is not KEY=VALUE", "write e.g. --set dump.max_tokens=100000")
    try:
        parsed = yaml.safe_load(value)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LprError(f"override '{text}' has a value that is not valid YAML ({first})", "quote the value") from None
    return key.strip().split("."), parsed


def apply_overrides(data: dict[str, Any], overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); unknown keys are caught later by validation."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for path, value in overrides:
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LprError(f"config file {path} does not exist", "pass an existing YAML file to --config")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LprError(f"config file {path} is not valid YAML (not UTF-8)", "fix the file's encoding") from None
    return parse_yaml(text, origin=str(path))


def parse_yaml(text: str, *, origin: str) -> dict[str, Any]:
    """A config's sections from YAML text (a file's, or a run directory's config.yaml at any URL)."""
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as err:  # e.g. a date like 2001-02-30
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LprError(f"config file {origin} is not valid YAML ({first})", "fix the file's syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LprError(f"config file {origin} must hold a mapping of sections", "start it with e.g. `model:`")
    return data


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
