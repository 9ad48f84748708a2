"""dedup: exact and near-duplicate removal, within and across sources, as map -> shuffle -> reduce.

    python -m tasks.dedup              # what `dvc repro dedup` runs

1. map       per shard, in parallel (tasks/lib/executor.py): normalise the text, hash it
             (exact key), MinHash the word shingles (tasks/lib/minhash.py, compiled with numba), cut the
             signature into LSH bands; signatures and band keys go to disk
2. shuffle   band by band, that band's keys of all documents (read from the shards' key
             files, 8 bytes per document) are sorted: equal keys form a bucket
3. edges     each member of a bucket is linked to the bucket's first document and to the one
             before it in input order (linear in the bucket's size, not quadratic), an edge
             kept only when their estimated Jaccard similarity reaches `threshold`; exact
             duplicates are linked to their group's first
4. clusters  connected components of the edges (union-find, scipy)
5. keep      per cluster one document: the highest role in `role_priority`; among those, the
             original that the others extend (a copy with appended boilerplate contains the
             original's text as its prefix), else the first in input order. Then the chaining
             guard: a member whose similarity to the kept document is below `threshold` (it
             joined through a chain of weak links) is released, and the released members of a
             cluster are clustered again among themselves, round by round (leader clustering:
             the best of them by role, then input order, is kept, those within `threshold`
             of it go, the rest go to the next round), so no two documents kept from one
             cluster are near-duplicates of each other (overlapping windows, pagination)
6. write     per shard, in parallel: the kept rows

Memory stays bounded: texts are read one shard at a time; what the reduce holds is a few
numbers per document (about 100 bytes: exact key, word count, labels, one band's keys at a
time); signatures stay in their shard files on disk and are read in blocks for the pairs
being verified. Metrics: removed per
source (exact / near), cluster sizes, candidate pairs and edges, documents released by the
chaining guard and how many of them a later round removed, sample clusters (`reports/dedup/clusters.json`) and pairwise precision /
recall against the ground truth of generated documents (`meta.duplicate_of`).
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.config import Params
from tasks.lib.errors import StageError
from tasks.lib.storage import DOC_SCHEMA, atomic_dir, read_shard_table, shard_files, source_folders, write_json

STAGE = "dedup"
PARAMS = ("seed", "collect.sources", "dedup")
UNTRACKED = ("executor",)  # how, not what: the outputs are the same on any executor
INPUTS = ("filtered",)
OUTPUTS = ("dedup", "report")


# ----------------------------------------------------------------------------- 1. map
@dataclass(frozen=True)
class SignTask:
    index: int
    path: str
    work: str
    shingle: int
    num_perm: int
    bands: int
    rows: int
    seed: int


def sketch(texts: pa.Array, shingle: int, num_perm: int, bands: int, rows: int, seed: int) -> tuple[np.ndarray, ...]:
    """(signatures, band keys, exact keys (N, 2), word counts) of a batch of texts."""
    from tasks.lib import minhash as mh

    norm = mh.normalise(texts)
    hashes, offsets = mh.word_hashes(norm)
    sig = mh.signatures(hashes, offsets, shingle, num_perm, seed)
    return sig, mh.band_keys(sig, bands, rows), mh.word_keys(hashes, offsets), np.diff(offsets)


def sign_shard(task: SignTask) -> dict[str, Any]:
    """Signatures, band keys, exact keys and word counts of one shard, written to `work`."""
    import xxhash

    table = read_shard_table(Path(task.path), ["id", "text", "meta"])
    sig, keys, exact2, nwords = sketch(table.column("text").combine_chunks(), task.shingle, task.num_perm, task.bands, task.rows, task.seed)
    work = Path(task.work)
    np.save(work / f"sig-{task.index:06d}.npy", sig)
    np.save(work / f"keys-{task.index:06d}.npy", keys)
    np.save(work / f"exact-{task.index:06d}.npy", exact2)
    np.save(work / f"nwords-{task.index:06d}.npy", nwords)
    # ground truth of generated documents (`meta.duplicate_of`): a 64-bit hash of the
    # original's id per row, so the reduce holds 8 bytes per document, not strings
    truth, has_truth, id_hashes = [], False, []
    for doc_id, meta in zip(table.column("id").to_pylist(), table.column("meta").to_pylist()):
        dup = json.loads(meta).get("duplicate_of") if meta and '"duplicate_of"' in meta else None
        has_truth = has_truth or dup is not None
        own = xxhash.xxh3_64_intdigest(doc_id.encode())
        id_hashes.append(own)
        truth.append(xxhash.xxh3_64_intdigest(str(dup).encode()) if dup is not None else own)
    np.save(work / f"truth-{task.index:06d}.npy", np.array(truth, dtype=np.uint64))
    np.save(work / f"ids-{task.index:06d}.npy", np.array(id_hashes, dtype=np.uint64))
    return {"docs": len(nwords), "has_truth": has_truth}


class ShardedRows:
    """The rows of per-shard .npy files as one (N, width) array, read on demand: `rows[idx]`
    gathers rows by global index and `rows[:, j]` is one column. Each shard file is mapped
    only while it is read, so memory holds what was asked for, not the files."""

    def __init__(self, files: list[Path], counts: np.ndarray, width: int, dtype):
        self.files, self.width, self.dtype = files, width, np.dtype(dtype)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), width)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, tuple):  # [:, j]: one column of every row
            rows, col = key
            if rows != slice(None):
                raise IndexError("ShardedRows supports rows[idx] and rows[:, j]")
            out = np.empty(self.shape[0], dtype=self.dtype)
            for s, f in enumerate(self.files):
                out[self.offsets[s] : self.offsets[s + 1]] = np.load(f, mmap_mode="r")[:, col]
            return out
        idx = np.asarray(key, dtype=np.int64)
        out = np.empty((len(idx), self.width), dtype=self.dtype)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        order = np.argsort(shard, kind="stable")
        bounds = np.searchsorted(shard[order], np.arange(len(self.files) + 1))
        for s in np.flatnonzero(np.diff(bounds)):
            pos = order[bounds[s] : bounds[s + 1]]
            m = np.load(self.files[s], mmap_mode="r")
            out[pos] = m[idx[pos] - self.offsets[s]]
            del m  # unmapped: the pages read do not stay in this process
        return out


@dataclass(frozen=True)
class PrefixTask:
    path: str
    rows: tuple[int, ...]
    lengths: tuple[int, ...]


def prefix_hashes(task: PrefixTask) -> list[int]:
    """The exact key of the first `length` normalised words of each requested row."""
    from tasks.lib import minhash as mh

    text = read_shard_table(Path(task.path), ["text"]).column("text").combine_chunks()
    return mh.prefix_keys(text.take(pa.array(task.rows, type=pa.int64())), task.lengths)


@dataclass(frozen=True)
class WriteTask:
    path: str
    out: str
    keep: bytes  # packed boolean mask of the shard's rows
    sizes: bytes  # int32 cluster size per row
    rows: int
    sample_rows: tuple[int, ...]


def write_shard(task: WriteTask) -> dict[int, str]:
    """Write the kept rows of one shard (cluster size added to meta); return the first 300
    characters of the rows asked for the report's sample clusters."""
    table = read_shard_table(Path(task.path), None)
    keep = np.unpackbits(np.frombuffer(task.keep, dtype=np.uint8))[: task.rows].astype(bool)
    sizes = np.frombuffer(task.sizes, dtype=np.int32)
    metas = table.column("meta").to_pylist()
    new_meta = [json.dumps({**json.loads(m), "dedup_cluster_size": int(sizes[i])}, sort_keys=True) for i, m in enumerate(metas)]
    table = table.set_column(3, "meta", pa.array(new_meta, pa.string()))
    kept = table.filter(pa.array(keep))
    Path(task.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(kept.cast(DOC_SCHEMA), task.out, compression="zstd")
    texts = table.column("text")
    return {r: texts[r].as_py()[:300] for r in task.sample_rows}


# ----------------------------------------------------------------------------- 3-5. the reduce
class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def bucket_edges(keys: np.ndarray, neighbours: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(first, member) pairs linking every member of a bucket (equal keys) to its first
    document in input order: len(bucket) - 1 edges per bucket. With `neighbours`, also each
    member to the one before it in input order (up to 2 (len(bucket) - 1) edges): a chain of
    overlapping windows has its far ends in one bucket, where only neighbours are similar."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    new_group = np.ones(len(order), dtype=bool)
    new_group[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_first = order[np.maximum.accumulate(np.where(new_group, np.arange(len(order)), 0))]
    member = ~new_group
    a, b = group_first[member], order[member]
    if neighbours:
        prev = np.zeros(len(order), dtype=bool)
        prev[1:] = member[1:] & ~new_group[:-1]  # the one before is a member too, not the first
        a, b = np.concatenate([a, order[np.flatnonzero(prev) - 1]]), np.concatenate([b, order[prev]])
    return a, b


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label of each node: the smallest index of its connected component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    return first[labels]


def find_clusters(sig: np.ndarray, keys: np.ndarray, exact: np.ndarray, threshold: float, verify: bool) -> tuple[np.ndarray, dict[str, int]]:
    """Cluster label per document (the smallest member index) from exact keys and LSH band
    keys, and counts of what each step found. `sig` and `keys` are arrays or ShardedRows
    (only `sig[idx]`, `keys[:, band]` and `.shape` are used)."""
    from tasks.lib.minhash import jaccard

    n = len(exact)
    # exact duplicates: linked to the first document with the same normalised text
    ea, eb = bucket_edges(exact[:, 0] ^ (exact[:, 1] * np.uint64(0x9E3779B97F4A7C15)) if n else np.zeros(0, np.uint64))
    same = (exact[ea] == exact[eb]).all(1) if len(ea) else np.zeros(0, bool)  # a 64-bit collision is not a duplicate
    ea, eb = ea[same], eb[same]
    is_rep = np.ones(n, dtype=bool)
    is_rep[eb] = False
    reps = np.flatnonzero(is_rep)
    edges_a, edges_b = [ea], [eb]
    candidates = verified = 0
    for band in range(keys.shape[1]):
        fa, fb = bucket_edges(keys[:, band][reps], neighbours=True)  # one band at a time: 8 bytes per document
        fa, fb = reps[fa], reps[fb]
        candidates += len(fa)
        if verify and len(fa):
            ok = np.zeros(len(fa), dtype=bool)
            for s in range(0, len(fa), 100_000):  # bounded memory: signatures read in blocks
                ok[s : s + 100_000] = jaccard(np.asarray(sig[fa[s : s + 100_000]]), np.asarray(sig[fb[s : s + 100_000]])) >= threshold
            fa, fb = fa[ok], fb[ok]
        verified += len(fa)
        edges_a.append(fa)
        edges_b.append(fb)
    labels = components(n, np.concatenate(edges_a), np.concatenate(edges_b))
    return labels, {"exact_pairs": int(len(ea)), "candidate_pairs": int(candidates), "near_edges": int(verified)}


def choose_keep(labels: np.ndarray, role_rank: np.ndarray, nwords: np.ndarray, exact: np.ndarray, prefix_of) -> np.ndarray:
    """The kept document of each multi-member cluster: {label: index}. `prefix_of(requests)`
    takes {index: length} and returns {index: exact key of its first `length` words}."""
    multi = np.flatnonzero(np.bincount(labels, minlength=len(labels))[labels] > 1)  # singletons need no choice
    order = multi[np.lexsort((multi, role_rank[multi], labels[multi]))]  # by cluster, then role, then input order
    keep: dict[int, int] = {}
    contenders: dict[int, list[int]] = defaultdict(list)
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, bounds) if len(order) else []:
        label = int(labels[members[0]])
        best = members[role_rank[members] == role_rank[members[0]]]
        keep[label] = int(best[0])
        texts = {tuple(exact[i]) for i in best}
        if len(texts) > 1:
            contenders[label] = [int(i) for i in best]
    # the original is the shortest contender when another contender extends it (its prefix)
    requests: dict[int, int] = {}
    shortest: dict[int, int] = {}
    for label, best in contenders.items():
        s = min(best, key=lambda i: (nwords[i], i))
        shortest[label] = s
        for i in best:
            if i != s:
                requests[i] = int(nwords[s])
    prefixes = prefix_of(requests) if requests else {}
    for label, best in contenders.items():
        s = shortest[label]
        full = (int(exact[s][0]) << 64) | int(exact[s][1])
        if any(prefixes.get(i) == full for i in best if i != s):
            keep[label] = s
    return keep


# ----------------------------------------------------------------------------- the stage
def pairwise_scores(pred, truth) -> dict[str, float]:
    """Pairwise precision/recall of a clustering against ground-truth clusters (labels as
    arrays: each document's predicted and true cluster)."""
    pred, truth = np.asarray(pred), np.asarray(truth)

    def pairs(*columns: np.ndarray) -> int:  # same-cluster pairs, clusters = equal values in every column
        if len(columns[0]) == 0:
            return 0
        order = np.lexsort(columns[::-1])
        new = np.zeros(len(order), dtype=bool)
        new[0] = True
        for c in columns:
            sc = c[order]
            new[1:] |= sc[1:] != sc[:-1]
        sizes = np.diff(np.append(np.flatnonzero(new), len(order))).astype(np.int64)
        return int((sizes * (sizes - 1) // 2).sum())

    tp = pairs(pred, truth)
    pred_pairs, true_pairs = pairs(pred), pairs(truth)
    return {"precision": tp / max(pred_pairs, 1), "recall": tp / max(true_pairs, 1), "true_pairs": true_pairs, "predicted_pairs": pred_pairs}


def recluster(final: np.ndarray, released: np.ndarray, labels: np.ndarray, role_rank: np.ndarray, similarity, threshold: float,
              max_rounds: int = 10_000, block: int = 100_000) -> tuple[int, int]:
    """Leader clustering of the released documents, per original cluster, in rounds: each
    round keeps the best remaining member of every cluster (lowest role rank, then first in
    input order) and points the members within `threshold` of it at it (in `final`, in
    place); the others go to the next round. A kept document was below `threshold` to every
    earlier round's keep, so no two kept members of a cluster are near-duplicates. Each round
    costs one similarity per remaining member; a chain of n windows needs about n / (the
    windows one window covers) rounds. Returns (documents removed, rounds)."""
    todo = np.asarray(released, dtype=np.int64)
    removed = rounds = 0
    while len(todo) and rounds < max_rounds:
        rounds += 1
        # per original cluster, the leader: the smallest (role rank, index)
        order = np.lexsort((todo, role_rank[todo], labels[todo]))
        todo = todo[order]
        lab = labels[todo]
        first = np.ones(len(todo), dtype=bool)
        first[1:] = lab[1:] != lab[:-1]
        leader_of = todo[first][np.cumsum(first) - 1]
        rest = ~first
        if not rest.any():
            break
        a, b = todo[rest], leader_of[rest]
        sim = np.concatenate([similarity(a[i : i + block], b[i : i + block]) for i in range(0, len(a), block)])
        close = sim >= threshold
        final[a[close]] = b[close]
        removed += int(close.sum())
        todo = a[~close]
    return removed, rounds


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    from tasks.lib.executor import Executor
    from tasks.lib.minhash import jaccard

    cfg, ex = params.dedup, params.executor
    roles = {s.name: s.role for s in params.collect.sources}
    rank = {role: i for i, role in enumerate(cfg.role_priority)}
    shards = [(name, f) for name, folder in source_folders(inputs["filtered"]).items() if name in roles for f in shard_files(folder)]
    with atomic_dir(outputs["dedup"]) as out, Executor(ex.kind, ex.workers, ex.ray_address, desc="dedup") as pool:
        work = out / ".work"
        work.mkdir()
        # 1. map
        tasks = [SignTask(i, str(f), str(work), cfg.shingle_words, cfg.num_perm, cfg.bands, cfg.rows, params.seed) for i, (_, f) in enumerate(shards)]
        signed = pool.map(sign_shard, tasks)
        counts = np.array([r["docs"] for r in signed], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        n = int(offsets[-1])
        # 2. shuffle: what the reduce holds is a few numbers per document; signatures and band
        # keys stay in the shards' files (ShardedRows reads the rows or the band asked for)
        def files(kind: str) -> list[Path]:
            return [work / f"{kind}-{i:06d}.npy" for i in range(len(shards))]

        def gather(kind: str, empty: np.ndarray) -> np.ndarray:
            return np.concatenate([np.load(f) for f in files(kind)]) if shards else empty

        sig = ShardedRows(files("sig"), counts, cfg.num_perm, np.uint32)
        keys = ShardedRows(files("keys"), counts, cfg.bands, np.uint64)
        # ids are the documents' identity downstream (the mix index, samples): two with one id
        # mean a broken input, found here from 8-byte hashes, named from the shard
        id_hash = gather("ids", np.zeros(0, np.uint64))
        uniq, first, seen = np.unique(id_hash, return_index=True, return_counts=True)
        if (seen > 1).any():
            g = int(first[np.flatnonzero(seen > 1)[0]])
            s_idx = int(np.searchsorted(offsets, g, side="right") - 1)
            dup_id = read_shard_table(shards[s_idx][1], ["id"]).column("id")[g - int(offsets[s_idx])].as_py()
            raise StageError(f"{int((seen - 1).sum())} document id(s) occur more than once in {inputs['filtered']}, e.g. {dup_id!r} "
                             f"({shards[s_idx][1]}): ids must be unique; rerun the collect and quality stages")
        del uniq, first, seen, id_hash
        exact = gather("exact", np.zeros((0, 2), np.uint64))
        nwords = gather("nwords", np.zeros(0, np.int64))
        source_of = np.repeat(np.arange(len(shards), dtype=np.int32), counts)
        shard_source = [name for name, _ in shards]
        shard_rank = np.array([rank.get(roles[name], len(rank)) for name in shard_source], dtype=np.int16)
        role_rank = shard_rank[source_of] if n else np.zeros(0, np.int16)
        # 3-4. edges and clusters
        labels, found = find_clusters(sig, keys, exact, cfg.threshold, cfg.verify)

        # 5. keep one per cluster, then the chaining guard
        def prefix_of(requests: dict[int, int]) -> dict[int, int]:
            by_shard: dict[int, list[int]] = defaultdict(list)
            for g in sorted(requests):
                by_shard[int(source_of[g])].append(g)
            jobs = [(s, PrefixTask(str(shards[s][1]), tuple(int(g - offsets[s]) for g in gs), tuple(requests[g] for g in gs)))
                    for s, gs in by_shard.items()]
            results = pool.map(prefix_hashes, [j for _, j in jobs])
            return {g: h for (s, _), hs in zip(jobs, results) for g, h in zip(by_shard[s], hs)}

        keep_of = choose_keep(labels, role_rank, nwords, exact, prefix_of)
        lookup = np.arange(n, dtype=np.int64)  # a singleton's label is its own index
        if keep_of:
            lookup[np.fromiter(keep_of.keys(), np.int64, len(keep_of))] = np.fromiter(keep_of.values(), np.int64, len(keep_of))
        keep_idx = lookup[labels]
        del lookup
        in_cluster = keep_idx != np.arange(n)
        same_text = (exact == exact[keep_idx]).all(1)
        weak = in_cluster & ~same_text
        if cfg.verify and weak.any():
            idx = np.flatnonzero(weak)
            sim = np.concatenate([jaccard(np.asarray(sig[idx[s : s + 100_000]]), np.asarray(sig[keep_idx[idx[s : s + 100_000]]]))
                                  for s in range(0, len(idx), 100_000)])
            released = idx[sim < cfg.threshold]
        else:
            released = np.zeros(0, dtype=np.int64)
        final = keep_idx.copy()
        final[released] = released  # a released document is kept, unless a later round removes it
        reclustered, rounds = recluster(final, released, labels, role_rank,
                                        lambda a, b: np.asarray(jaccard(np.asarray(sig[a]), np.asarray(sig[b]))), cfg.threshold)
        kept = final == np.arange(n)
        size = np.bincount(final, minlength=n)[final].astype(np.int32)

        # 6. write, and pick the sample clusters shown in the report
        multi = np.flatnonzero(kept & (size > 1))
        rng = np.random.default_rng(params.seed)
        picks = sorted(rng.choice(multi, size=min(cfg.sample_clusters, len(multi)), replace=False).tolist()) if len(multi) else []
        sample_members = {k: np.flatnonzero(final == k)[:10].tolist() for k in picks}
        wanted = {g for ms in sample_members.values() for g in ms}
        writes = []
        for s, (name, path) in enumerate(shards):
            lo, hi = int(offsets[s]), int(offsets[s + 1])
            rows = tuple(int(g - lo) for g in sorted(wanted) if lo <= g < hi)
            writes.append(WriteTask(str(path), str(out / name / path.name), np.packbits(kept[lo:hi]).tobytes(),
                                    size[lo:hi].tobytes(), hi - lo, rows))
        snippets = pool.map(write_shard, writes)
        import shutil

        truth = gather("truth", np.zeros(0, np.uint64)) if any(r["has_truth"] for r in signed) else None
        shutil.rmtree(work)
        for name in sorted(set(shard_source)):
            (out / name).mkdir(parents=True, exist_ok=True)

    # metrics
    text_of = {int(offsets[s]) + r: t for s, snip in enumerate(snippets) for r, t in snip.items()}
    ids_needed = wanted
    ids = {}
    if ids_needed:
        for s, (_, path) in enumerate(shards):
            lo, hi = int(offsets[s]), int(offsets[s + 1])
            rows = [g - lo for g in ids_needed if lo <= g < hi]
            if rows:
                col = read_shard_table(path, ["id"]).column("id")
                ids.update({lo + r: col[r].as_py() for r in rows})
    samples = [[{"id": ids[g], "kept": bool(g == k), "text": text_of[g]} for g in members] for k, members in sample_members.items()]
    with atomic_dir(outputs["report"]) as rep:
        write_json(rep / "clusters.json", samples)
    per_source: dict[str, Counter] = defaultdict(Counter)
    removed = ~kept
    exact_removed = removed & (exact == exact[final]).all(1)
    for s, name in enumerate(shard_source):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        c = per_source[name]
        c["docs_in"] += hi - lo
        c["kept"] += int(kept[lo:hi].sum())
        c["exact_removed"] += int(exact_removed[lo:hi].sum())
        c["near_removed"] += int((removed & ~exact_removed)[lo:hi].sum())
    cluster_sizes = Counter(size[kept & (size > 1)].tolist())
    bins = {"2": 0, "3": 0, "4-5": 0, "6-10": 0, "11+": 0}
    for sz, cnt in cluster_sizes.items():
        key = "2" if sz == 2 else "3" if sz == 3 else "4-5" if sz <= 5 else "6-10" if sz <= 10 else "11+"
        bins[key] += cnt
    metrics: dict[str, Any] = {
        "sources": {name: {k: int(c[k]) for k in ("docs_in", "kept", "exact_removed", "near_removed")} for name, c in sorted(per_source.items())},
        "docs_in": n, "kept": int(kept.sum()),
        "clusters_with_duplicates": int(len(multi)), "cluster_sizes": bins, "largest_cluster": int(size.max()) if n else 0,
        "released_by_chaining_guard": int(len(released)), "reclustered_after_release": reclustered, "recluster_rounds": rounds, **found,
    }
    if truth is not None:
        metrics["vs_ground_truth"] = pairwise_scores(final, truth)
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
