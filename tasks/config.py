"""Typed configuration: one pydantic model per section of `params.yaml`.

Every knob of the pipeline lives in `params.yaml`; this module is the one place that
validates it. Unknown keys are rejected and every error names the key path and the bad
value, e.g. ``params.yaml: quality.rules.min_words = -5: Input should be greater than or
equal to 0``.

    from tasks.config import load_params
    params = load_params("params.yaml")
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A bad `params.yaml`: the message names the key and the value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Role = Literal["reference", "crawl", "code", "instruction"]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]+$", min_length=1, max_length=64)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


# ---------------------------------------------------------------- paths
class Paths(Section):
    """Every input and output of every stage, written down once; dvc.yaml reads them
    as ${paths.<key>} so deps/outs and the code can't drift apart."""

    raw: str = "data/raw"
    filtered: str = "data/filtered"
    dropped: str = "data/dropped"
    quality_model: str = "models/quality"
    dedup: str = "data/dedup"
    mix: str = "data/mix"
    tokenizer: str = "models/tokenizer"
    tokens: str = "data/tokens"
    reports: str = "reports"
    base: str = "models/base"
    sft: str = "models/sft"
    preferences: str = "data/preferences"
    human_preferences: str = "examples/preferences.jsonl"
    reward: str = "models/reward"
    rlhf: str = "models/rlhf"
    checkpoints: str = "checkpoints"


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
    corpus: Literal["python_docs", "python_code", "synthetic_crawl"]
    limit: Annotated[int, Field(gt=0)] | None = None
    num_docs: Annotated[int, Field(gt=0)] = 2000  # synthetic_crawl only
    crawl_mix: CrawlMix = CrawlMix()  # synthetic_crawl only


class HFSource(Section):
    """`datasets.load_dataset(path, name, data_files=..., split=..., streaming=...)`: a hub
    dataset name, or a packaged builder ("json", "parquet", "text", "csv") with local files."""

    kind: Literal["hf"]
    name: Name
    role: Role
    path: str
    config_name: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    text_field: str = "text"
    id_field: str | None = None
    streaming: bool = True
    limit: Annotated[int, Field(gt=0)] | None = None


class FilesSource(Section):
    """Local files: globs of .jsonl/.json (one object per line), .parquet or .txt (one
    document per file)."""

    kind: Literal["files"]
    name: Name
    role: Role
    globs: list[str] = Field(min_length=1)
    text_field: str = "text"
    id_field: str | None = None
    limit: Annotated[int, Field(gt=0)] | None = None


Source = Annotated[Union[BuiltinSource, HFSource, FilesSource], Field(discriminator="kind")]


class Collect(Section):
    sources: list[Source] = Field(min_length=1)
    min_chars: Annotated[int, Field(ge=1)] = 1
    max_chars: Annotated[int, Field(gt=0)] = 200_000
    shard_docs: Annotated[int, Field(gt=0)] = 5000

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

    roles: list[Role] = ["reference", "crawl"]
    min_words: Annotated[int, Field(ge=0)] = 30
    max_words: Annotated[int, Field(gt=0)] = 100_000
    min_mean_word_len: Annotated[float, Field(ge=0)] = 3.0
    max_mean_word_len: Annotated[float, Field(gt=0)] = 10.0
    max_symbol_word_ratio: Annotated[float, Field(ge=0)] = 0.1
    min_alpha_word_fraction: Fraction = 0.7
    min_punct_line_fraction: Fraction = 0.1
    max_duplicate_line_fraction: Fraction = 0.3
    max_top_2gram_fraction: Fraction = 0.2
    max_duplicate_5gram_fraction: Fraction = 0.3
    max_boilerplate_line_fraction: Fraction = 0.2
    boilerplate_phrases: list[str] = [
        "cookie", "privacy policy", "terms of use", "all rights reserved", "javascript",
        "sign up", "log in", "subscribe", "click here", "lorem ipsum",
    ]


class Classifier(Section):
    """fastText quality classifier, trained as GPT-3's: reference sources are positives,
    crawl sources negatives; applied to the roles listed in `apply_to_roles`."""

    apply_to_roles: list[Role] = ["crawl"]
    holdout_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    keep_rule: Literal["pareto", "threshold"] = "threshold"
    threshold: Fraction = 0.1
    pareto_alpha: Annotated[float, Field(gt=0)] = 9.0
    epoch: Annotated[int, Field(gt=0)] = 10
    lr: Annotated[float, Field(gt=0)] = 0.5
    dim: Annotated[int, Field(gt=0)] = 32
    word_ngrams: Annotated[int, Field(ge=1, le=5)] = 2
    min_count: Annotated[int, Field(ge=1)] = 2
    bucket: Annotated[int, Field(gt=0)] = 200_000
    max_chars: Annotated[int, Field(gt=0)] = 20_000  # text fed to fastText per document


class Quality(Section):
    rules: Rules = Rules()
    classifier: Classifier = Classifier()
    write_dropped: bool = True


# ---------------------------------------------------------------- dedup
class Dedup(Section):
    shingle_words: Annotated[int, Field(ge=1, le=20)] = 5
    num_perm: Annotated[int, Field(ge=16, le=1024)] = 128
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.7
    verify: bool = True  # keep only candidate pairs whose estimated Jaccard >= threshold
    sample_clusters: Annotated[int, Field(ge=0)] = 5
    role_priority: list[Role] = ["reference", "instruction", "code", "crawl"]


# ---------------------------------------------------------------- mix
class Mix(Section):
    """Training mixture: target share per source (normalised), measured in `unit`.
    A source is repeated for several epochs or subsampled to hit its share."""

    weights: dict[str, Annotated[float, Field(ge=0)]]
    unit: Literal["bytes", "docs"] = "bytes"
    total: Annotated[int, Field(gt=0)] | None = None  # None: the size of the deduped data
    max_epochs: Annotated[float, Field(gt=0)] = 4.0
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.05

    @model_validator(mode="after")
    def _some_weight(self) -> "Mix":
        if sum(self.weights.values()) <= 0:
            raise ValueError("mix.weights must have at least one positive weight")
        return self


# ---------------------------------------------------------------- tokenizer / tokenize
SPECIAL_TOKENS = {
    "eot": "<|endoftext|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end_of_turn": "<|end_of_turn|>",
    "reward": "<|reward|>",
    "pad": "<|pad|>",
}


class Tokenizer(Section):
    vocab_size: Annotated[int, Field(ge=300, le=1_000_000)] = 8192
    min_frequency: Annotated[int, Field(ge=1)] = 2
    max_train_bytes: Annotated[int, Field(gt=0)] | None = None


class Tokenize(Section):
    batch_docs: Annotated[int, Field(gt=0)] = 1000


# ---------------------------------------------------------------- model and training
class Model(Section):
    """Transformer size (vocab_size comes from the tokenizer). GPT-2 small: 12 layers,
    12 heads, d_model 768, max_seq_len 1024."""

    n_layer: Annotated[int, Field(ge=1)] = 4
    n_head: Annotated[int, Field(ge=1)] = 4
    d_model: Annotated[int, Field(ge=8)] = 256
    max_seq_len: Annotated[int, Field(ge=8)] = 256
    mlp_ratio: Annotated[int, Field(ge=1)] = 4
    positions: Literal["rope", "learned"] = "rope"
    tie_embeddings: bool = True
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0

    @model_validator(mode="after")
    def _heads(self) -> "Model":
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model ({self.d_model}) must split into n_head ({self.n_head}) heads of even size")
        return self


class TrainConfig(Section):
    """Optimizer, schedule and runtime of one training stage."""

    steps: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)]
    grad_accum: Annotated[int, Field(ge=1)] = 1
    lr: Annotated[float, Field(gt=0)]
    min_lr_ratio: Fraction = 0.1
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.95
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    eval_every: Annotated[int, Field(ge=1)] = 100
    eval_batches: Annotated[int, Field(ge=1)] = 8
    ckpt_every: Annotated[int, Field(ge=1)] = 100
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile, CUDA only
    peak_tflops: Annotated[float, Field(gt=0)] | None = None  # for MFU; known GPUs are detected


class Pretrain(Section):
    train: TrainConfig
    seq_len: Annotated[int, Field(ge=8)] | None = None  # None: model.max_seq_len
    sample_prompts: list[str] = ["def ", "The "]
    sample_tokens: Annotated[int, Field(ge=1)] = 48


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
    limit: Annotated[int, Field(gt=0)] | None = None


class Instructions(Section):
    """Prompts are split by a hash of their id, so each stage sees its own prompts (as
    InstructGPT's separate SFT / RM / PPO prompt sets) and evaluation sees none of them."""

    sources: list[InstructionSource] = Field(min_length=1)
    split: dict[Literal["sft", "sft_val", "rm", "ppo", "eval"], Annotated[float, Field(ge=0)]] = {
        "sft": 0.5, "sft_val": 0.05, "rm": 0.2, "ppo": 0.2, "eval": 0.05}
    max_prompt_tokens: Annotated[int, Field(ge=4)] = 64
    max_response_tokens: Annotated[int, Field(ge=4)] = 96


class SFT(Section):
    train: TrainConfig


class Preferences(Section):
    labeler: Literal["gold", "file"] = "gold"
    prompts: Annotated[int, Field(ge=2)] = 200
    k: Annotated[int, Field(ge=2, le=16)] = 4
    max_new_tokens: Annotated[int, Field(ge=1)] = 48
    temperature: Annotated[float, Field(gt=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    batch_size: Annotated[int, Field(ge=1)] = 32
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.15
    repetition_penalty: Annotated[float, Field(ge=0)] = 0.5
    unfinished_penalty: Annotated[float, Field(ge=0)] = 0.3
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the gold labeler's samples are drawn
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class Reward(Section):
    train: TrainConfig  # batch_size counts prompts: all C(K,2) pairs of a prompt share a batch


class KLControl(Section):
    beta: Annotated[float, Field(ge=0)] = 0.05
    adaptive: bool = True
    target: Annotated[float, Field(gt=0)] = 2.0
    horizon: Annotated[int, Field(ge=1)] = 1000


class PPO(Section):
    steps: Annotated[int, Field(ge=1)] = 40
    batch_prompts: Annotated[int, Field(ge=2)] = 16
    max_new_tokens: Annotated[int, Field(ge=1)] = 32
    temperature: Annotated[float, Field(gt=0)] = 1.0
    ppo_epochs: Annotated[int, Field(ge=1)] = 2
    minibatches: Annotated[int, Field(ge=1)] = 2
    lr: Annotated[float, Field(gt=0)] = 1e-5
    value_lr: Annotated[float, Field(gt=0)] = 5e-5
    clip: Annotated[float, Field(gt=0)] = 0.2
    value_clip: Annotated[float, Field(gt=0)] = 0.2
    vf_coef: Annotated[float, Field(ge=0)] = 0.5
    entropy_coef: Annotated[float, Field(ge=0)] = 0.0
    gamma: Annotated[float, Field(gt=0, le=1)] = 1.0
    lam: Annotated[float, Field(ge=0, le=1)] = 0.95
    whiten_advantages: bool = True
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    kl: KLControl = KLControl()
    ptx_coef: Annotated[float, Field(ge=0)] = 0.0  # PPO-ptx: weight of the pretraining loss
    ptx_batch: Annotated[int, Field(ge=1)] = 4
    ckpt_every: Annotated[int, Field(ge=1)] = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class Promotion(Section):
    """When the candidate (the newest version of `model`) beats the current `champion` on
    `metric` by at least `min_margin` (re-measured on this run's evaluation prompts), the
    alias moves; otherwise the candidate becomes `challenger`."""

    model: Literal["rlhf", "sft"] = "rlhf"
    metric: Literal["win_rate_vs_sft_rm", "win_rate_vs_sft_gold", "rm_score", "gold_score"] = "win_rate_vs_sft_rm"
    min_margin: Annotated[float, Field(ge=0)] = 0.0


class Evaluate(Section):
    prompts: Annotated[int, Field(ge=2)] = 64
    samples_per_prompt: Annotated[int, Field(ge=2)] = 2  # >= 2 to measure self-similarity
    max_new_tokens: Annotated[int, Field(ge=1)] = 48
    temperature: Annotated[float, Field(gt=0)] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    few_shot: Annotated[int, Field(ge=0)] = 3  # examples in the base model's document-style prompt
    val_batches: Annotated[int, Field(ge=1)] = 8
    samples_in_report: Annotated[int, Field(ge=0)] = 5
    promotion: Promotion = Promotion()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


# ---------------------------------------------------------------- operations
class MLflow(Section):
    experiment: str = "gpt-pipeline"


class Orchestration(Section):
    """The Prefect flow: retries per stage and the schedule of the served deployment."""

    retries: Annotated[int, Field(ge=0)] = 1
    retry_delay_s: Annotated[int, Field(ge=0)] = 10
    deployment_name: str = "gpt-pipeline-nightly"
    cron: str = "0 2 * * *"


class Params(Section):
    seed: int = 1337
    paths: Paths = Paths()
    mlflow: MLflow = MLflow()
    orchestration: Orchestration = Orchestration()
    collect: Collect
    quality: Quality = Quality()
    dedup: Dedup = Dedup()
    mix: Mix
    tokenizer: Tokenizer = Tokenizer()
    tokenize: Tokenize = Tokenize()
    model: Model = Model()
    pretrain: Pretrain
    instructions: Instructions
    sft: SFT
    preferences: Preferences = Preferences()
    reward: Reward
    ppo: PPO = PPO()
    evaluate: Evaluate = Evaluate()

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


def _format_errors(err: ValidationError, source: str, raw: Any) -> str:
    lines = [f"{source}: {err.error_count()} invalid value(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        # pydantic reports discriminated unions with the tag as a path element; keep it, it
        # tells the user which kind of source the error is about.
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{…}"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (value {shown})")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            lines.append(f"  {loc} = {shown}: {e['msg']}")
    return "\n".join(lines)


def parse_params(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, raw)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, str(path))


def section_dict(params: Params, dotted: str) -> Any:
    """The plain value of a section or key named as in dvc.yaml (`quality`, `collect.sources`)."""
    value: Any = params.model_dump(mode="json")
    for part in dotted.split("."):
        value = value[part]
    return value
