"""Instruction formats, the gold judge, and the preferences stage with both labelers."""

import json

import pytest
import torch

from tasks import instructions, judge, preferences
from tasks.config import InstructionSource, Instructions, parse_params
from tasks.storage import StageError
from tests.conftest import tiny_raw_params


def test_common_instruction_formats_map_to_messages():
    u, a = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}
    assert instructions.to_messages({"messages": [u, a]}) == [u, a]
    assert instructions.to_messages({"prompt": "Q", "response": "A"}) == [u, a]
    assert instructions.to_messages({"question": "Q", "answer": "A"}) == [u, a]
    assert instructions.to_messages({"instruction": "Q", "input": "", "output": "A"}) == [u, a]
    assert instructions.to_messages({"instruction": "Q", "input": "ctx", "output": "A"})[0]["content"] == "Q\n\nctx"
    assert instructions.to_messages({"text": "no conversation here"}) is None


def test_files_and_hf_instruction_sources(tmp_path):
    f = tmp_path / "alpaca.jsonl"
    f.write_text("\n".join(json.dumps({"instruction": f"Say {i}", "input": "", "output": f"{i}"}) for i in range(5)) + "\n")
    cfg = Instructions(sources=[InstructionSource(name="alp", kind="files", globs=[str(f)]),
                                InstructionSource(name="hfj", kind="hf", path="json", data_files=str(f), limit=3)])
    rows = instructions.load(cfg, seed=0)
    assert [r["id"] for r in rows] == [f"alp/{i}" for i in range(5)] + [f"hfj/{i}" for i in range(3)]
    assert rows[0]["messages"][1]["content"] == "0"
    splits = instructions.splits(cfg, seed=0)
    assert sum(len(v) for v in splits.values()) == 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(StageError, match="yielded no conversation"):
        instructions.load(Instructions(sources=[InstructionSource(name="b", kind="files", globs=[str(bad)])]), 0)


def test_builtin_python_qa_is_real_documentation():
    pairs = list(instructions.python_qa(limit=50, seed=0))
    assert len(pairs) == 50
    q, a = pairs[0]["messages"]
    assert "`" in q["content"] and len(a["content"].split()) >= 4


def test_gold_judge_on_literal_answers():
    ref = "Serialize obj to a JSON formatted string."
    good = judge.gold_score("Serialize obj to a JSON formatted string.", ref, finished=True)
    wordy = judge.gold_score("Serialize obj to a JSON string string string string string string.", ref, finished=True)
    unfinished = judge.gold_score("Serialize obj to a JSON formatted string.", ref, finished=False)
    off = judge.gold_score("Open a file for reading.", ref, finished=True)
    assert good == pytest.approx(1.0)
    assert good > wordy and good > unfinished == pytest.approx(0.7) and good > off
    assert judge.repetition("a b c a b c a b c") > 0.5 and judge.repetition("one two three four") == 0


def test_human_preference_file_and_its_errors(tmp_path):
    ok = tmp_path / "p.jsonl"
    ok.write_text(json.dumps({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]}) + "\n"
                  + json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}) + "\n")
    recs = preferences.read_human(ok)
    assert recs[0]["ranking"] == [2, 0, 1] and recs[1]["completions"] == ["good", "bad"] and recs[1]["ranking"] == [0, 1]
    for line, msg in [("{", "not JSON"), (json.dumps({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 0]}), "'ranking' must order"),
                      (json.dumps({"prompt": "p", "chosen": "a"}), "'chosen' and 'rejected'"), (json.dumps({"completions": []}), "'prompt'")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(StageError, match=msg):
            preferences.read_human(bad)
    assert preferences.agreement([{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1]}] * 2
                                 + [{"prompt": "p", "completions": ["a", "b"], "ranking": [1, 0]}]) == pytest.approx(1 / 3)


def test_gold_labeler_samples_k_and_ranks_them(tmp_path):
    from tasks.model import GPT, ModelConfig, save_checkpoint
    from tasks.tokenizer import train_bpe

    raw = tiny_raw_params()
    raw["instructions"]["sources"] = [{"name": "python_qa", "kind": "builtin", "corpus": "python_qa", "limit": 200}]
    raw["preferences"].update(labeler="gold", prompts=10, k=3, max_new_tokens=6, val_fraction=0.4)
    params = parse_params(raw)
    texts = [m["content"] for ex in instructions.load(params.instructions, 0) for m in ex["messages"]]
    tok = train_bpe(iter(texts), 400, 1)
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok/tokenizer.json"))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "sft", GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=16, max_seq_len=96)),
                    tmp_path / "tok", {"chat": True})
    m = preferences.run(params, {"sft": tmp_path / "sft", "human_preferences": tmp_path / "none"}, {"preferences": tmp_path / "out"})
    assert m["prompts"] == 10 and m["pairs"] == 30 and m["k_mean"] == 3
    recs = [json.loads(line) for f in ("train", "val") for line in (tmp_path / "out" / f"{f}.jsonl").read_text().splitlines()]
    assert len(recs) == 10
    for r in recs:
        assert len(r["completions"]) == 3 and sorted(r["ranking"]) == [0, 1, 2]
        ordered = [r["scores"][i] for i in r["ranking"]]
        assert ordered == sorted(ordered, reverse=True)
