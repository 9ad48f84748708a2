"""The one model: a decoder-only transformer, its generation with a KV cache, and checkpoints.

- `GPT`: token embeddings, pre-norm blocks (RMSNorm → causal self-attention through
  `F.scaled_dot_product_attention`, flash attention on GPU → RMSNorm → GELU MLP), rotary or
  learned positions, tied or untied output head.
- `ScalarModel`: the same transformer with a scalar head on the hidden states; the reward
  model reads it at the reward-readout token, the PPO value function at every position.
- `generate`: batched sampling (left padding) with temperature, top-k, top-p, stop tokens,
  with or without a KV cache (greedy decoding gives the same tokens either way).
- `save_checkpoint` / `load_checkpoint`: `model.safetensors` + `config.json` + the tokenizer;
  loading needs no pickle and no training code beyond this file.

    from tasks.lib.model import load_checkpoint
    model, meta = load_checkpoint("models/sft")
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

from tasks.lib.errors import StageError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    max_seq_len: int = 256
    mlp_ratio: int = 4
    positions: str = "rope"  # rope | learned
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


# ------------------------------------------------------------------------------ blocks
def rope_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, 1, T, head_dim/2) for integer positions (B, T)."""
    half = cfg.head_dim // 2
    inv = 1.0 / (cfg.rope_base ** (torch.arange(half, device=positions.device, dtype=torch.float32) / half))
    angles = positions.float()[..., None] * inv  # (B, T, half)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer for a batch, preallocated for `capacity` positions.

    Filled one of two ways. By default each call appends at `length` (a Python int) and
    attends over the positions filled so far. Once `slot` is set (a one-element long tensor), a
    call writes its single position at `slot` and attends over the whole buffer, the caller's
    mask hiding what is not filled yet: every decoding step then has the same shapes and no
    Python number changes between steps, which is what torch.compile and CUDA graphs need
    (the logits agree with the appending way's to rounding: attention over a longer buffer
    sums in another order)."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, device, dtype):
        shape = (batch, cfg.n_head, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0
        self.slot: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slot is not None:
            self.k[layer].index_copy_(2, self.slot, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, self.slot, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        t = k.shape[2]
        self.k[layer][:, :, self.length : self.length + t] = k
        self.v[layer][:, :, self.length : self.length + t] = v
        end = self.length + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, rope, mask, cache):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.cfg.n_head, self.cfg.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        drop = self.cfg.dropout if self.training else 0.0
        if mask is None:  # training: plain causal attention, the flash kernel on GPU
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, layer)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache):
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache))
        return x + self.drop(self.out(F.gelu(self.fc(self.norm2(x)))))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_head or cfg.head_dim % 2:
            raise ValueError(f"d_model {cfg.d_model} must split into {cfg.n_head} heads of even size")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("attn.proj.weight", "out.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        # small inits (GPT-2): an N(0, 1) tied embedding trains much slower
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def hidden(self, idx: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d). `positions` (B, T) and a boolean `mask`
        (B, 1, T, S: True = may attend) are needed for padded batches and the cache."""
        B, T = idx.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            if start + T > self.cfg.max_seq_len:  # plain ints: no graph break under torch.compile
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        elif (cache is None or cache.slot is None) and int(positions.max()) >= self.cfg.max_seq_len:
            # (a slot step is checked by its caller: reading a number back here would
            # synchronise with the GPU at every token)
            raise ValueError(f"sequence of {int(positions.max()) + 1} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.tok(idx)
        rope = None
        if self.pos is not None:
            x = x + self.pos(positions)
        else:
            rope = rope_tables(self.cfg, positions)
        if cache is not None and mask is None and cache.length > 0:
            # queries are the last T of S keys: causal attention aligned at the bottom right
            # (SDPA's is_causal aligns at the top left, right only when T == S)
            S = cache.length + T
            mask = torch.ones(T, S, dtype=torch.bool, device=idx.device).tril(diagonal=S - T)[None, None]
        for block in self.blocks:
            x = block(x, rope, mask, cache)
        if cache is not None and cache.slot is None:
            cache.length += T
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                last_only: bool = False, **kw):
        """Logits (B, T, V), and the mean next-token cross-entropy over positions where
        `loss_mask` is true (all positions when it is None) if `targets` are given. `last_only`:
        the logits of the last position only, (B, 1, V) (sampling needs no others). Generation
        goes through here too, not through `hidden` and `head`: a model sharded by FSDP
        gathers its top-level weights in this call's hooks."""
        h = self.hidden(idx, **kw)
        logits = self.head(h[:, -1:] if last_only else h)
        if targets is None:
            return logits, None
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        if loss_mask is None:
            return logits, losses.mean()
        m = loss_mask.flatten().float()
        return logits, (losses * m).sum() / m.sum().clamp(min=1.0)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok.weight.numel() + (self.pos.weight.numel() if self.pos is not None else 0)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls (+ the attention scores), as PaLM."""
        T = seq_len or self.cfg.max_seq_len
        n = self.num_params(non_embedding=True) + self.cfg.vocab_size * self.cfg.d_model  # the head's matmul counts
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.d_model * T


class ScalarModel(nn.Module):
    """A transformer with a scalar head: reward model (read at the reward token) and value
    function. The output is `gain * head(h) + bias`; the reward stage sets gain and bias (saved
    with the weights) so that rewards of the training completions have mean 0 and std 1. The
    reward model's scores, PPO's rewards and the value function initialised from it then
    share one scale."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.body = GPT(cfg)
        self.score = nn.Linear(cfg.d_model, 1)
        nn.init.normal_(self.score.weight, 0.0, 1.0 / math.sqrt(cfg.d_model + 1))
        nn.init.zeros_(self.score.bias)
        self.register_buffer("gain", torch.ones(()))
        self.register_buffer("bias", torch.zeros(()))

    @property
    def cfg(self) -> ModelConfig:
        return self.body.cfg

    def normalise(self, mean: float, std: float) -> None:
        """Fold a normalisation into the output: new output = (old output - mean) / std."""
        with torch.no_grad():
            self.gain.div_(std)
            self.bias.sub_(mean).div_(std)

    def forward(self, idx: torch.Tensor, **kw) -> torch.Tensor:
        return self.score(self.body.hidden(idx, **kw)).squeeze(-1) * self.gain + self.bias  # (B, T)


# ------------------------------------------------------------------------------ generation
def padded_batch(seqs: list[list[int]], pad_id: int, left: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, valid) of shape (B, max len), padded on the left or the right."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        tokens[i, sl] = torch.tensor(s, dtype=torch.long)
        valid[i, sl] = True
    return tokens.to(device), valid.to(device)


def attention_mask(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean (B, 1, q_len, S): causal over the last q_len of S keys, padding masked out.
    A padding query row may see itself so no row is all-False (SDPA would give NaN)."""
    B, S = valid.shape
    causal = torch.ones(S, S, dtype=torch.bool, device=valid.device).tril()[S - q_len :]
    mask = causal[None] & valid[:, None, :]
    eye = torch.zeros(S, S, dtype=torch.bool, device=valid.device).fill_diagonal_(True)[S - q_len :]
    return (mask | eye[None])[:, None]


def positions_of(valid: torch.Tensor) -> torch.Tensor:
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B, 1) index of one draw per row, with probability proportional to the row's
    non-negative weights: the inverse of the cumulative sum at the row's uniform number `u`
    (B, 1) (torch.multinomial took a quarter of a decoding step on the CPU)."""
    c = weights.cumsum(-1)
    return torch.searchsorted(c, u * c[:, -1:], right=True).clamp(max=c.shape[-1] - 1)


NUCLEUS_CANDIDATES = 1024  # the nucleus is looked for among this many most likely tokens first


def _nucleus_draw(vals: torch.Tensor, order: torch.Tensor, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """A draw from the nucleus of rows of probabilities sorted in descending order (`order`:
    their token ids): the smallest head whose mass exceeds top_p, renormalised."""
    vals = vals.masked_fill(vals.cumsum(-1) - vals > top_p, 0.0)
    return order.gather(-1, _draw(vals, u)).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator=None,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One token per row. One uniform number per row is drawn from `generator` at each call;
    `rows` = (offset, total): these rows are rows offset ... of a batch of `total` sampled
    together (the uniforms of all `total` are drawn, these rows use theirs), so a batch split
    over processes draws what the whole batch would."""
    if temperature <= 0:
        return logits.argmax(-1)
    offset, total = rows or (0, logits.shape[0])
    u = torch.rand(total, 1, generator=generator, device=logits.device)[offset : offset + logits.shape[0]]
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is None or top_p >= 1.0:
        return _draw(probs, u).squeeze(-1)
    # Sorting the whole vocabulary was most of a decoding step: the nucleus is looked for
    # among the most likely NUCLEUS_CANDIDATES tokens (97% of rows at T = 0.7 on the default
    # model), and only rows whose nucleus is larger (a flat distribution) are sorted whole
    vals, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]))
    fits = vals.sum(-1) > top_p
    if bool(fits.all()):
        return _nucleus_draw(vals, order, top_p, u)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    if bool(fits.any()):
        out[fits] = _nucleus_draw(vals[fits], order[fits], top_p, u[fits])
    out[~fits] = _nucleus_draw(*probs[~fits].sort(-1, descending=True), top_p, u[~fits])
    return out


def decode_step(model: GPT, tok: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, V) after one new token per row (`tok`, `pos`: (B, 1)), attending to the cache
    positions where `keys` is true. With `cache.slot` set, the token is written at the slot and
    `keys` covers the whole buffer (B, capacity): the same shapes at every step, so
    torch.compile traces it once per batch shape. Without, it is appended and `keys` covers
    the positions filled so far, itself included."""
    return model(tok, positions=pos, mask=keys[:, None, None, :], cache=cache, last_only=True)[0][:, -1]


_COMPILED: dict[str, Any] = {}
COMPILE_WIDTH = 64  # compiled decoding pads prompts to a multiple of this: fewer shapes to trace


def compiled_decode_step(device_type: str):
    """decode_step under torch.compile; on CUDA with CUDA graphs (mode reduce-overhead), so a
    step is one graph launch instead of a few hundred kernel launches."""
    if device_type not in _COMPILED:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED[device_type] = torch.compile(decode_step, dynamic=False, mode=mode)
    return _COMPILED[device_type]


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, pad_id: int, stop_ids: tuple[int, ...] = (),
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             use_cache: bool = True, compile: bool = False, generator: torch.Generator | None = None,
             entropy: list[float] | None = None, on_token=None, rows: tuple[int, int] | None = None) -> list[list[int]]:
    """New tokens for each prompt, up to and including the first stop token. `entropy`, when
    given, is extended by the entropy (nats) of the model's own distribution (temperature 1)
    at each new token of each row, row by row: what a separate pass over the sequences would
    compute, for the cost of one log-softmax per step. `on_token(tokens)`, when given, gets each
    step's new token of every row (pad for rows already done) as it is drawn: streaming.
    `rows` = (offset, total): these prompts are rows offset ... of a batch of `total` split over
    processes; each draws what the whole batch would (sample_next), so a row's tokens do not
    depend on how the batch was split.

    With the cache (the default), the prompts are run once (prefill) and each new token is one
    `decode_step` over a preallocated cache; `compile` runs that step under torch.compile (CUDA
    graphs on a GPU) over the whole buffer at every step (the static shapes compiling needs).
    Without the cache, every step reruns the whole sequence: the slow reference."""
    device = next(model.parameters()).device
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - max(len(p) for p in prompts))
    if max_new_tokens <= 0:
        raise ValueError(f"prompts of {max(len(p) for p in prompts)} tokens leave no room in max_seq_len {model.cfg.max_seq_len}")
    if generator is not None and generator.device != device:
        # torch samples on the GPU only with a GPU generator: derive one from the caller's
        # (seeded, CPU) generator, so GPU runs stay reproducible and CPU runs are unchanged
        generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    was_training = model.training
    model.eval()
    tokens, valid = padded_batch(prompts, pad_id, left=True, device=device)
    if use_cache and compile and tokens.shape[1] % COMPILE_WIDTH:
        # more left padding (masked out) so that batches of similar prompts share one shape
        extra = COMPILE_WIDTH - tokens.shape[1] % COMPILE_WIDTH
        tokens = F.pad(tokens, (extra, 0), value=pad_id)
        valid = F.pad(valid, (extra, 0), value=False)
    B, P = tokens.shape
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    ent = torch.zeros((B, max_new_tokens), device=device) if entropy is not None else None
    stops = torch.tensor(stop_ids or [-1], device=device)
    step = compiled_decode_step(device.type) if compile else decode_step
    # cuDNN attention builds a plan for every new shape, and decoding without the cache changes
    # the key length at every step: on an H100 the first 256 samples took 17 s with it, 3.6 s without
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        if use_cache:
            # under autocast the keys and values come out in bf16: a cache of that dtype avoids
            # recasting every cached position at every step
            cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else next(model.parameters()).dtype
            cache = KVCache(model.cfg, B, P + max_new_tokens, device, cache_dtype)
            # prefill; the head on the last position only: the prompt's other positions would
            # cost (B x prompt x vocab) for nothing
            pos = positions_of(valid)
            logits = model(tokens, positions=pos, mask=attention_mask(valid, P), cache=cache, last_only=True)[0][:, -1]
            keys = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
            keys[:, :P] = valid
            if compile:
                cache.slot = torch.full((1,), P, dtype=torch.long, device=device)
            pos = pos[:, -1:]
        for t in range(max_new_tokens):
            if not use_cache:
                logits = model(tokens, positions=positions_of(valid), mask=attention_mask(valid, tokens.shape[1]), last_only=True)[0][:, -1]
            if entropy is not None:
                lp = F.log_softmax(logits.float(), -1)
                ent[:, t] = -(lp.exp() * lp).sum(-1)
            nxt = sample_next(logits, temperature, top_k, top_p, generator, rows)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, t] = nxt
            if on_token is not None:
                on_token(nxt.tolist())
            done |= torch.isin(nxt, stops)
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            if use_cache:
                keys[:, P + t] = True
                pos = pos + 1
                if compile:
                    logits = step(model, nxt[:, None], pos, keys, cache)
                    cache.slot += 1
                else:  # attending to the filled positions only: the fewest keys
                    logits = step(model, nxt[:, None], pos, keys[:, : P + t + 1], cache)
            else:
                tokens = torch.cat([tokens, nxt[:, None]], 1)
                valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
    model.train(was_training)
    result = []
    ents = ent.tolist() if ent is not None else None
    for i, row in enumerate(out.tolist()):
        seq = []
        for tok in row[: t + 1]:
            seq.append(tok)
            if tok in stop_ids:
                break
        result.append(seq)
        if ents is not None:
            entropy.extend(ents[i][: len(seq)])
    return result


# ------------------------------------------------------------------------------ checkpoints
def save_checkpoint(folder: str | Path, model: nn.Module, tokenizer_dir: str | Path | None, meta: dict[str, Any] | None = None) -> None:
    """model.safetensors + config.json (+ tokenizer.json) into `folder` (written by the caller atomically)."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = model.module if hasattr(model, "module") else model  # DDP
    raw = getattr(raw, "_orig_mod", raw)  # torch.compile
    save_model(raw, str(folder / "model.safetensors"))  # handles the tied embedding
    kind = "scalar" if isinstance(raw, ScalarModel) else "lm"
    body = raw.body if kind == "scalar" else raw
    info = {"kind": kind, "model": asdict(raw.cfg), "num_params": body.num_params(), "flops_per_token": body.flops_per_token(), **(meta or {})}
    (folder / "config.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
        shutil.copy(Path(tokenizer_dir) / "tokenizer.json", folder / "tokenizer.json")


class CheckpointError(StageError):
    """A checkpoint folder that is missing, incomplete or corrupt."""


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu", kind: str | None = None) -> tuple[nn.Module, dict]:
    """(model, config.json contents). `kind="scalar"` turns an LM checkpoint into a
    ScalarModel whose body starts from those weights (a new, random scalar head)."""
    from safetensors.torch import load_model

    folder = Path(folder)
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{folder}: no checkpoint (model.safetensors + config.json)")
    try:
        info = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg = ModelConfig(**info["model"])
        stored = info["kind"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{cfg_path}: not a valid checkpoint config ({type(err).__name__}: {err})") from None
    if stored not in ("lm", "scalar"):
        raise CheckpointError(f"{cfg_path}: unknown model kind {stored!r}")
    try:
        if stored == "scalar" or kind != "scalar":
            model: nn.Module = ScalarModel(cfg) if stored == "scalar" else GPT(cfg)
            load_model(model, str(weights), device=str(device))
        else:
            model = ScalarModel(cfg)
            load_model(model.body, str(weights), device=str(device))
    except Exception as err:  # safetensors raises its own error types for torn or foreign files
        raise CheckpointError(f"{weights}: unreadable or does not match config.json ({type(err).__name__}: {str(err)[:200]})") from None
    return model.to(device), info
