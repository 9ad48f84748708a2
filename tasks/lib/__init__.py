"""The library the stages share. It knows nothing of `params.yaml`: functions take plain
values or any object with the attributes they name (a section of the config, a dataclass).

- storage       atomic outputs, Parquet document shards, progress lines
- hashing       stable pseudo-random splits by id, content hashes of files and folders
- corpora       the built-in offline corpora (Python's docs and code, a generated crawl)
- bpe           byte-level BPE: train, load, the special tokens
- template      the chat template and plain-text completion
- tokens        binary token files and random training windows
- instructions  instruction data in the common formats, prompt splits, SFT batches
- model         the transformer, its scalar-head variant, generation, checkpoints
- runtime       device, precision and distributed context
- train         the one training loop (optimizer, schedule, resume, history)
- rl            PPO math: log-probs, GAE, whitening, KL control
- judge         the programmatic gold judge
- rankings      human rankings: the record format, ties and flags, pairs, agreement, the locked file
- interop       Label Studio and Argilla export and import of rankings
- tracking      MLflow runs; registry: the model registry; pyfunc_model: the served model
- deps          the import closure of a stage (what its DVC `deps` must list)
"""
