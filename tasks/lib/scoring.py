"""Language-model scores that need no judge: log-likelihoods and bits per byte.

- `token_bytes(tok)`           UTF-8 bytes of each token id (0 for special tokens)
- `corpus_losses(...)`         next-token losses over a token array in consecutive windows:
                               perplexity, and bits per byte (nanochat's tokenizer-independent
                               figure: nats over non-special targets / (ln 2 x their bytes))
- `continuation_logprobs(...)` log p(continuation | context) and whether greedy decoding
                               would produce it: multiple-choice benchmarks and lm-eval
- `multiple_choice(...)`       accuracy (by summed log-prob) and length-normalised accuracy
                               (by log-prob per character of the choice, as lm-eval's acc_norm)

Shared by the evaluate stage and the lm-evaluation-harness adapter (tasks/lib/harness.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def token_bytes(tok) -> np.ndarray:
    """Bytes each token id stands for. Byte-level BPE writes every byte as one character of
    its alphabet, so a token's length in characters is its length in bytes; added (special)
    tokens stand for no text."""
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    out = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for piece, i in tok.get_vocab().items():
        if i < len(out) and piece not in special:
            out[i] = len(piece)
    return out


@torch.no_grad()
def corpus_losses(model, tokens: np.ndarray, bytes_of: np.ndarray, seq_len: int, batch: int = 16, max_tokens: int | None = None,
                  autocast=None) -> dict[str, float]:
    """Losses over `tokens` cut into consecutive windows of seq_len + 1 (every target token
    predicted once, from at most seq_len tokens of context), at most `max_tokens` targets."""
    import contextlib

    n = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    if n < 1:
        raise ValueError("need at least 2 tokens")
    dev = next(model.parameters()).device
    starts = list(range(0, n, seq_len))
    nats_all = nats_text = 0.0
    count_all = 0
    n_bytes = 0
    for i in range(0, len(starts), batch):
        rows = [np.asarray(tokens[s : min(s + seq_len, n) + 1], dtype=np.int64) for s in starts[i : i + batch]]
        width = max(len(r) for r in rows)
        x = torch.zeros((len(rows), width - 1), dtype=torch.long)
        y = torch.zeros((len(rows), width - 1), dtype=torch.long)
        valid = torch.zeros((len(rows), width - 1), dtype=torch.bool)
        for j, r in enumerate(rows):
            x[j, : len(r) - 1] = torch.from_numpy(r[:-1])
            y[j, : len(r) - 1] = torch.from_numpy(r[1:])
            valid[j, : len(r) - 1] = True
        with autocast or contextlib.nullcontext():
            logits = model(x.to(dev))[0]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(dev).flatten(), reduction="none").view_as(y).cpu().double()
        b = torch.from_numpy(bytes_of[y.numpy()])
        nats_all += float((loss * valid).sum())
        count_all += int(valid.sum())
        text = valid & (b > 0)
        nats_text += float((loss * text).sum())
        n_bytes += int((b * text).sum())
    return {"perplexity": math.exp(nats_all / count_all), "bits_per_byte": nats_text / (math.log(2) * max(n_bytes, 1)),
            "tokens": count_all, "bytes": n_bytes}


@torch.no_grad()
def continuation_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, batch: int = 16,
                          autocast=None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation tokens), greedy) per (context ids, continuation ids). A
    context too long for the model loses its start; the continuation is never cut."""
    import contextlib

    dev = next(model.parameters()).device
    T = model.cfg.max_seq_len
    out: list[tuple[float, bool]] = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        seqs = []
        for ctx, cont in chunk:
            if not cont:
                raise ValueError("an empty continuation has no log-probability")
            if len(cont) > T:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's {T}")
            seqs.append((list(ctx) + list(cont))[-(T + 1) :])
        width = max(len(s) for s in seqs) - 1
        x = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        for j, s in enumerate(seqs):
            x[j, : len(s) - 1] = torch.tensor(s[:-1])
        rows, pos, targets = [], [], []
        for j, ((ctx, cont), s) in enumerate(zip(chunk, seqs)):
            n = len(cont)
            rows += [j] * n
            pos += list(range(len(s) - 1 - n, len(s) - 1))  # positions that predict the continuation
            targets += s[-n:]
        with autocast or contextlib.nullcontext():
            h = model.hidden(x.to(dev))
            # the head and softmax at the continuation's positions only, not at every position
            logp = F.log_softmax(model.head(h[torch.tensor(rows), torch.tensor(pos)]).float(), -1).cpu()
        tok = torch.tensor(targets)
        lp = logp.gather(1, tok[:, None]).squeeze(1)
        hit = logp.argmax(-1) == tok
        start = 0
        for ctx, cont in chunk:
            n = len(cont)
            out.append((float(lp[start : start + n].sum()), bool(hit[start : start + n].all())))
            start += n
    return out


def multiple_choice(model, tok, items: Sequence[dict], prefix_ids: list[int], text_ids, pad_id: int, autocast=None) -> dict[str, float]:
    """Items {"context": str, "choices": [str], "gold": index}: the model picks the choice
    with the highest log-probability (acc) or log-probability per character of the choice
    (acc_norm, as lm-eval computes it). Choices are scored as " " + choice after the context."""
    pairs, owner = [], []
    for k, it in enumerate(items):
        ctx = prefix_ids + text_ids(it["context"])
        for c in it["choices"]:
            pairs.append((ctx, text_ids(" " + c)))
            owner.append(k)
    lps = continuation_logprobs(model, pairs, pad_id, autocast=autocast)
    acc = acc_norm = 0
    pos = 0
    for it in items:
        n = len(it["choices"])
        lp = np.array([lp for lp, _ in lps[pos : pos + n]])
        per_char = lp / np.array([len(c) for c in it["choices"]])
        acc += int(np.argmax(lp) == it["gold"])
        acc_norm += int(np.argmax(per_char) == it["gold"])
        pos += n
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "items": len(items),
            "chance": float(np.mean([1 / len(it["choices"]) for it in items]))}
