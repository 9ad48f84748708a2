"""The pipeline's code: one module per DVC stage, the library they share, the config.

Stages (each `python -m tasks.<stage>`, one stage of dvc.yaml, in this order):
sources, collect, quality, dedup, mix, tokenizer, tokenize, pretrain, sft, preferences,
reward, ppo, evaluate. A stage never imports another stage: what two stages share lives in
`tasks/lib/`, which knows nothing of params.yaml. `config.py` is the schema of params.yaml;
`stage.py` is the entry point every stage runs through. Tools, not stages: `chat.py` talks to a
trained model; `label.py` serves the page where people rank sampled completions (and
converts rankings to and from Label Studio and Argilla).
"""
