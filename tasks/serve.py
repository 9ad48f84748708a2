"""serve: the assistant for people, an OpenAI-compatible API and a web chat page (a tool, not a stage).

    python -m tasks.serve                                   # models:/rlhf@champion (or the best that exists), http://127.0.0.1:8000/
    python -m tasks.serve --model models:/rlhf@champion --model models:/sft@latest --port 8000
    python -m tasks.serve --checkpoint models/sft           # a checkpoint folder (make serve-model)

The API is the subset of OpenAI's that chat clients, evaluation harnesses and UIs use:

    GET  /v1/models                 the models this server answers with (the ones given, and every
                                    registered version of them, loaded on first use)
    POST /v1/chat/completions       {"model", "messages": [{"role": system|user|assistant, "content"}],
                                     "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream"}
    GET  /                          the chat page: conversations with history, streamed answers, a
                                    model picker and the sampling settings

The conversation goes through the project's chat template (tasks/lib/template.py): a system
message is read as a user turn (the models were not trained with a system role), the answer
is the assistant's next turn and stops at `<|end_of_turn|>` (`finish_reason: stop`), at a
`stop` string, or at `max_tokens` (`length`). A conversation that does not fit the model's
context with `max_tokens` more is refused (400, `context_length_exceeded`): nothing is cut
silently. `usage` counts the prompt's and the answers' tokens. With `stream: true` the answer
comes as server-sent events (`chat.completion.chunk` objects, then `data: [DONE]`). The `n`
answers of one request are sampled together in one batch; requests take turns (one model,
one CPU or GPU). `seed` makes an answer repeatable. Bad requests get OpenAI's error body
(`{"error": {"message", "type", "param", "code"}}`) with 400 (404 for an unknown model), and
the server keeps serving. It binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import sys
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PAGE = Path(__file__).with_name("chat.html")
MAX_LOADED = 3  # models kept in memory (the least recently used is dropped)
DEFAULT_URI = "models:/rlhf@champion"


class ServeError(Exception):
    """A request that cannot be answered: `status`, and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class Models:
    """The models this server answers with: id -> loaded (model, template, is_chat), loaded on
    first use from a checkpoint folder or a registered version, at most MAX_LOADED at once."""

    def __init__(self, sources: list[str], device: str, notes=print, compile: bool = False):
        self.device, self.notes = device, notes
        self.compile = compile  # generation's decode step under torch.compile (CUDA graphs on a GPU)
        self.sources: dict[str, str] = {}  # model id -> checkpoint folder or models:/ URI
        self.loaded: OrderedDict[str, tuple] = OrderedDict()
        for s in sources:
            if s.startswith("models:/"):
                from tasks.lib import registry

                concrete, (name, version) = registry.resolve_uri(s, warn=notes)  # @champion falls back, with a line
                self.sources[s] = concrete
                for v in registry._versions(name):  # the picker: every registered version of it
                    self.sources.setdefault(f"models:/{name}/{v.version}", f"models:/{name}/{v.version}")
            else:
                if not (Path(s) / "model.safetensors").is_file():
                    raise FileNotFoundError(f"{s}: no checkpoint (model.safetensors + config.json)")
                self.sources[s] = s
        self.default = sources[0]

    def ids(self) -> list[str]:
        return list(self.sources)

    def get(self, model_id: str | None):
        model_id = model_id or self.default
        if model_id not in self.sources:
            raise ServeError(404, f"The model '{model_id}' does not exist (this server has {', '.join(self.sources)})", "model",
                             "model_not_found")
        if model_id not in self.loaded:
            from tasks.lib.bpe import load_tokenizer
            from tasks.lib.model import load_checkpoint
            from tasks.lib.template import Template

            src = self.sources[model_id]
            if src.startswith("models:/"):
                from tasks.lib import registry

                folder = registry.download_checkpoint(src)
            else:
                folder = Path(src)
            model, info = load_checkpoint(folder, self.device)
            if info["kind"] != "lm":
                raise ServeError(400, f"'{model_id}' is a reward model, not a language model", "model", "model_not_found")
            self.loaded[model_id] = (model.eval(), Template(load_tokenizer(folder)), bool(info.get("chat", False)))
            while len(self.loaded) > MAX_LOADED:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(model_id)
        return self.loaded[model_id]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """The request body, validated; wrong types and values become OpenAI-style 400s."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=8)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    hits = [text.index(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


class Answerer:
    """Turns a validated request into answers: the prompt ids, the context check, sampling."""

    def __init__(self, models: Models):
        self.models = models
        self.lock = threading.Lock()  # one generation at a time

    def prepare(self, req) -> dict:
        model, t, chat = self.models.get(req.model)
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        if chat:
            ids = t.chat(messages)
        else:  # a base model continues a document: the conversation's text
            ids = [t.eot, *t.text_ids("\n\n".join(m["content"] for m in messages))]
        limit = model.cfg.max_seq_len
        max_new = req.max_completion_tokens or req.max_tokens or max(1, min(256, limit - len(ids)))
        if len(ids) + max_new > limit:
            raise ServeError(400, f"This model's maximum context length is {limit} tokens. However, you requested {len(ids) + max_new} "
                                  f"tokens ({len(ids)} in the messages, {max_new} in the completion). Please reduce the length of the "
                                  "messages or the completion.", "messages", "context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise ServeError(400, "'stop' takes at most 4 strings", "stop", None)
        return {"model": model, "t": t, "ids": ids, "max_new": max_new, "stops": stops, "id": req.model or self.models.default}

    def generate(self, req, job: dict, on_token=None) -> list[list[int]]:
        import torch

        from tasks.lib.model import generate

        seed = req.seed if req.seed is not None else int(torch.randint(2**62, (1,)))
        t = job["t"]
        with self.lock:
            return generate(job["model"], [job["ids"]] * req.n, job["max_new"], pad_id=t.pad, stop_ids=t.stop_ids,
                            temperature=req.temperature, top_p=req.top_p, generator=torch.Generator().manual_seed(seed), on_token=on_token,
                            compile=self.models.compile)

    def finish(self, job: dict, out: list[int]) -> tuple[str, str]:
        """(text, finish_reason) of one generated row."""
        t = job["t"]
        text, stopped = cut_at_stop(t.decode(out), job["stops"])
        ended = bool(out) and out[-1] in t.stop_ids
        return text, "stop" if (stopped or ended) else "length"


def make_app(models: Models):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="gpt-pipeline assistant", docs_url=None, redoc_url=None)
    answerer = Answerer(models)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(ServeError(400, f"Invalid value for '{param}': {first['msg']}", param, "invalid_value").body(), status_code=400)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "gpt-pipeline"} for m in models.ids()]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        job = await asyncio.to_thread(answerer.prepare, body)
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if not body.stream:
            outs = await asyncio.to_thread(answerer.generate, body, job)
            choices = []
            for i, out in enumerate(outs):
                text, reason = answerer.finish(job, out)
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None})
            usage = {"prompt_tokens": len(job["ids"]), "completion_tokens": sum(len(o) for o in outs)}
            return {"id": cid, "object": "chat.completion", "created": created, "model": job["id"], "choices": choices,
                    "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}}
        return StreamingResponse(stream(body, job, cid, created), media_type="text/event-stream")

    async def stream(body, job, cid, created):
        """Tokens as they are drawn; each row's text is re-decoded whole and the new part sent,
        so a character split over two tokens arrives in one piece."""
        q: queue.Queue = queue.Queue()
        t = job["t"]

        def run():
            try:
                q.put(("done", answerer.generate(body, job, on_token=lambda toks: q.put(("tok", toks)))))
            except Exception as err:  # noqa: BLE001 - reported to the client as the stream's last event
                q.put(("error", err))

        threading.Thread(target=run, daemon=True).start()
        rows = [[] for _ in range(body.n)]
        sent = [""] * body.n
        finished = [False] * body.n

        def chunk(i: int, delta: dict, reason=None) -> str:
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": job["id"],
                                          "choices": [{"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}]}) + "\n\n"

        for i in range(body.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        while True:
            kind, payload = await asyncio.to_thread(q.get)
            if kind == "error":
                yield "data: " + json.dumps(ServeError(500, f"generation failed: {payload}").body()) + "\n\n"
                break
            if kind == "tok":
                for i, tok in enumerate(payload):
                    if finished[i]:
                        continue
                    rows[i].append(tok)
                    text, stopped = cut_at_stop(t.decode(rows[i]), job["stops"])
                    if text.endswith("\ufffd") and not stopped:  # half a character: wait for the rest
                        continue
                    if text[len(sent[i]):]:
                        yield chunk(i, {"content": text[len(sent[i]):]})
                        sent[i] = text
                    if stopped or tok in t.stop_ids:
                        finished[i] = True
                        yield chunk(i, {}, "stop")
                continue
            for i, out in enumerate(payload):  # done: the rows that ran out of tokens
                if not finished[i]:
                    text, reason = answerer.finish(job, out)
                    if text[len(sent[i]):]:
                        yield chunk(i, {"content": text[len(sent[i]):]})
                    yield chunk(i, {}, reason)
            break
        yield "data: [DONE]\n\n"

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], help=f"registered model URI (repeatable; default {DEFAULT_URI})")
    ap.add_argument("--checkpoint", action="append", default=[], help="a checkpoint folder (repeatable)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--compile", action="store_true",
                    help="decode under torch.compile (CUDA graphs on a GPU): faster tokens after the first requests, which compile")
    args = ap.parse_args(argv)
    if not 0 <= args.port < 65536:
        print(f"error: serve: --port {args.port}: not a port number", file=sys.stderr)
        return 2
    try:
        import torch

        from tasks.lib.tracking import tracking_uri

        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        sources = [*args.model, *args.checkpoint] or [DEFAULT_URI]
        models = Models(sources, device, notes=lambda line: print(line, file=sys.stderr), compile=args.compile)
        models.get(None)  # the default model loads before the first request (and a broken one fails here)
    except (FileNotFoundError, ServeError, ValueError) as err:
        print(f"error: serve: {getattr(err, 'message', err)}", file=sys.stderr)
        return 2
    import uvicorn

    print(f"serving {', '.join(models.ids()[:4])}{' …' if len(models.ids()) > 4 else ''} on http://{args.host}:{args.port}/ "
          "(OpenAI API at /v1; Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.run(make_app(models), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
