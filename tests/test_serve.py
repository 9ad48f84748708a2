"""The assistant for people: `python -m tasks.serve` answered through the official `openai`
client (plain and streamed, n, seed, stop, usage, bad requests with OpenAI's error body while
the server keeps serving), its chat page in headless Chromium (a conversation of two turns,
streamed), and the terminal chat keeping the conversation."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import CHROME, DRIVER, REPO, headless_chrome



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small chat model trained to answer every question with `It returns the length.`"""
    from tasks.lib.bpe import train_bpe
    from tasks.lib.model import GPT, ModelConfig, save_checkpoint
    from tasks.lib.template import Template

    d = tmp_path_factory.mktemp("serve")
    tok = train_bpe(iter(["What does len do? It returns the length. Tell me more. café"] * 40), 320, 1)
    (d / "tok").mkdir()
    tok.save(str(d / "tok/tokenizer.json"))
    t = Template(tok)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=48, max_seq_len=64))
    seqs = [t.render([{"role": "user", "content": q}, {"role": "assistant", "content": "It returns the length."}])[0]
            for q in ("What does len do?", "Tell me more.", "café")]
    width = max(map(len, seqs))
    x = torch.full((len(seqs), width), t.pad)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = model(x[:, :-1], x[:, 1:], loss_mask=x[:, 1:] != t.pad)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(d / "ck", model.eval(), d / "tok", {"chat": True})
    return d / "ck"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tasks.serve", "--checkpoint", str(checkpoint), "--port", str(port)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.3)
    yield url, str(checkpoint)
    proc.terminate()
    proc.wait(timeout=30)


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0)


def test_the_openai_client_lists_and_chats(server):
    url, model_id = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == [model_id]
    r = c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "What does len do?"}], max_tokens=12, temperature=0)
    assert r.choices[0].message.content == "It returns the length." and r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.template import Template

    t = Template(load_tokenizer(model_id))
    prompt = t.chat([{"role": "user", "content": "What does len do?"}])
    answer = t.text_ids("It returns the length.") + [t.end_turn]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), len(answer), len(prompt) + len(answer))
    # a conversation: the history reaches the model through the template
    two = c.chat.completions.create(model=model_id, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does len do?"},
        {"role": "assistant", "content": "It returns the length."}, {"role": "user", "content": "Tell me more."}])
    assert two.usage.prompt_tokens == len(t.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does len do?"},
                                                  {"role": "assistant", "content": "It returns the length."}, {"role": "user", "content": "Tell me more."}]))
    # max_tokens cuts (finish_reason length); stop cuts at the string (finish_reason stop)
    short = c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "What does len do?"}], max_tokens=2, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    stopped = c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "What does len do?"}], max_tokens=12,
                                        temperature=0, stop=["the"])
    assert stopped.choices[0].message.content == "It returns " and stopped.choices[0].finish_reason == "stop"


def test_n_samples_and_the_seed(server):
    url, model_id = server
    c = client(url)
    msgs = [{"role": "user", "content": "café"}]
    a = c.chat.completions.create(model=model_id, messages=msgs, max_tokens=10, temperature=1.5, n=3, seed=7)
    b = c.chat.completions.create(model=model_id, messages=msgs, max_tokens=10, temperature=1.5, n=3, seed=7)
    other = c.chat.completions.create(model=model_id, messages=msgs, max_tokens=10, temperature=1.5, n=3, seed=8)
    texts = lambda r: [ch.message.content for ch in r.choices]  # noqa: E731
    assert len(a.choices) == 3 and [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts(a) == texts(b) and texts(a) != texts(other)


def test_streaming_gives_the_same_answer_in_chunks(server):
    url, model_id = server
    c = client(url)
    msgs = [{"role": "user", "content": "What does len do?"}]
    whole = c.chat.completions.create(model=model_id, messages=msgs, max_tokens=12, temperature=0.9, seed=3, n=2)
    chunks = list(c.chat.completions.create(model=model_id, messages=msgs, max_tokens=12, temperature=0.9, seed=3, n=2, stream=True))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks) and len(chunks) > 4
    for i in range(2):
        mine = [ch.choices[0] for ch in chunks if ch.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(m.delta.content or "" for m in mine) == whole.choices[i].message.content
        assert mine[-1].finish_reason == whole.choices[i].finish_reason and all(m.finish_reason is None for m in mine[:-1])


@pytest.mark.parametrize("body, status, param, code", [
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi " * 200}]}, 400, "messages", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}, 400, "messages", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n", "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 7}, 400, "top_p", "invalid_value"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": "hi"}, 400, "messages", "invalid_value"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param, code):
    import openai

    url, model_id = server
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps({"model": model_id, **body}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == status
    e = json.loads(err.value.read())["error"]
    assert (e["param"], e["code"]) == (param, code) and e["message"] and e["type"] == "invalid_request_error"
    kind = openai.NotFoundError if status == 404 else openai.BadRequestError
    with pytest.raises(kind):
        client(url).chat.completions.create(**{"model": model_id, **body})
    ok = client(url).chat.completions.create(model=model_id, messages=[{"role": "user", "content": "café"}], max_tokens=3)
    assert ok.choices[0].message.content is not None


def test_the_server_refuses_a_bad_start_with_one_line(tmp_path):
    for args, msg in ((["--checkpoint", str(tmp_path / "none")], "no checkpoint"), (["--port", "70000"], "not a port number")):
        res = subprocess.run([sys.executable, "-m", "tasks.serve", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]


@pytest.mark.skipif(not (CHROME and DRIVER), reason="no chromium/chromedriver binary: apt-get install -y chromium chromium-driver")
def test_the_chat_page_holds_a_streamed_conversation(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, model_id = server
    driver = headless_chrome(tmp_path / "profile", "1100,760")
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        assert driver.find_element(By.ID, "model").get_attribute("value") == model_id
        for field, value in (("temperature", "0"), ("max_tokens", "12")):  # the test model's context is 64 tokens
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        box = driver.find_element(By.ID, "input")
        for turn, question in enumerate(("What does len do?", "Tell me more.")):
            box.send_keys(question)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == turn + 1
                       and d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
                       and d.find_element(By.ID, "send").is_enabled())
        texts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg")]
        assert texts == ["What does len do?", "It returns the length.", "Tell me more.", "It returns the length."]
        stored = json.loads(driver.execute_script("return localStorage.getItem('gpt-pipeline-chat')"))
        conv = next(c for c in stored["convs"] if c["id"] == stored["current"])
        assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "user", "assistant"]
        driver.refresh()  # the conversation survives a reload
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 4)
        if os.environ.get("CHAT_PAGE_SCREENSHOT"):
            driver.save_screenshot(os.environ["CHAT_PAGE_SCREENSHOT"])
    finally:
        driver.quit()


def test_the_terminal_chat_keeps_the_conversation(checkpoint):
    """Two turns, then /reset: the second prompt holds the first exchange, the third does not
    (what the model saw is printed with --show-tokens)."""
    script = "What does len do?\nTell me more.\n/reset\nTell me more.\n\n"
    res = subprocess.run([sys.executable, "-m", "tasks.chat", "--checkpoint", str(checkpoint), "--temperature", "0", "--max-new-tokens", "10",
                          "--show-tokens"], input=script, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.template import Template

    t = Template(load_tokenizer(checkpoint))
    q1, q2, a = {"role": "user", "content": "What does len do?"}, {"role": "user", "content": "Tell me more."}, {
        "role": "assistant", "content": "It returns the length."}
    counts = [int(n) for n in re.findall(r"prompt of (\d+) tokens", res.stderr)]
    assert counts == [len(t.chat([q1])), len(t.chat([q1, a, q2])), len(t.chat([q2]))]
    assert res.stdout.count("It returns the length.") == 3 and "conversation reset" in res.stderr


@pytest.mark.parametrize("args, msg", [(["--top-p", "7"], "--top-p"), (["--max-new-tokens", "-3"], "--max-new-tokens"),
                                       (["--temperature", "-1"], "--temperature")])
def test_the_terminal_chat_refuses_bad_settings(checkpoint, args, msg):
    res = subprocess.run([sys.executable, "-m", "tasks.chat", "--checkpoint", str(checkpoint), "--prompt", "hi", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]


def test_the_terminal_chat_says_when_it_drops_old_turns(checkpoint):
    long = "What does len do? " * 6
    script = "\n".join([long] * 4) + "\n\n"
    res = subprocess.run([sys.executable, "-m", "tasks.chat", "--checkpoint", str(checkpoint), "--temperature", "0", "--max-new-tokens", "8"],
                         input=script, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "dropped the oldest" in res.stderr, res.stderr[-2000:]
    too_long = subprocess.run([sys.executable, "-m", "tasks.chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "8", "--prompt",
                               "What does len do? " * 40], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert too_long.returncode == 2 and "too long" in too_long.stderr


def test_the_terminal_chat_decodes_the_same_answer_compiled(checkpoint, capsys, monkeypatch):
    """--compile runs generation's decode step under torch.compile (the static-cache form, CUDA
    graphs on a GPU): the greedy answer is the plain one's."""
    import tasks.lib.model as model_lib
    from tasks.chat import main

    used = []
    real = model_lib.compiled_decode_step
    monkeypatch.setattr(model_lib, "compiled_decode_step", lambda device_type: used.append(device_type) or real(device_type))

    def answer(*extra):
        assert main(["--checkpoint", str(checkpoint), "--temperature", "0", "--max-new-tokens", "10", "--prompt", "What does len do?",
                     *extra]) == 0
        return capsys.readouterr().out

    plain = answer()
    assert not used
    compiled = answer("--compile")
    assert used == ["cpu"], "--compile must reach generation"
    assert "It returns the length." in plain and compiled == plain
