"""`fastadapters serve`: an OpenAI-compatible HTTP server over the engine (FastAPI and uvicorn: the `serve`
extra).

    app = build_app(Server(engine, tokenizer, base_name="base", adapter_root="adapters", api_key="k"))
    uvicorn.run(app, port=8000)

Endpoints: POST /v1/completions and /v1/chat/completions (streaming as server-sent events, or not; the
`model` field is an adapter name or the base model's name; max_tokens, temperature, top_p, seed, stop, n;
usage counts), GET /v1/models (the base and every adapter, with its type and whether it is resident),
POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's payloads; any fastadapters or PEFT folder
under --adapter-root), GET /health, GET /metrics (Prometheus).

The engine steps on its own thread; the event loop only queues requests and forwards tokens. Bad requests
get OpenAI-style JSON errors ({"error": {"message", "type", "param", "code"}}) with a 4xx status, and the
server keeps serving: 400 (bad fields, a prompt too long, a bad adapter folder), 401 (API key), 403 (a path
outside the adapter root), 404 (unknown model), 413 (body or prompt too large), 429 (queue full, with
Retry-After), 503 (not admitted within the request timeout). A client that disconnects mid-stream aborts its
request: its KV blocks and its hold on the adapter are freed at the next step.
"""

import asyncio
import json
import os
import signal
import threading
import time
import uuid

import torch

from fastadapters.config import BottleneckConfig, LoraConfig, PrefixConfig
from fastadapters.serving.engine import Engine
from fastadapters.serving.pool import AdapterPool


class ApiError(Exception):
    """An error the client gets as OpenAI-style JSON with `status`."""

    def __init__(self, status: int, message: str, param=None, kind: str = "invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


class Server:
    """The engine, its stepping thread, the tokenizer and the server's limits (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        *,
        base_name: str = "base",
        adapter_root: str | None = None,
        api_key: str | None = None,
        max_queue: int = 256,
        request_timeout: float = 60.0,
        max_body_bytes: int = 1 << 20,
        max_prompt_tokens: int | None = None,
    ):
        if engine.pool is None:
            raise ValueError("the server needs an Engine over an AdapterPool (Engine(pool))")
        self.engine, self.pool, self.tokenizer = engine, engine.pool, tokenizer
        self.base_name, self.api_key = base_name, api_key
        self.adapter_root = None if adapter_root is None else os.path.realpath(adapter_root)
        self.max_queue, self.request_timeout = max_queue, request_timeout
        self.max_body_bytes = max_body_bytes
        self.max_prompt_tokens = max_prompt_tokens or engine.max_positions or 4096
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="fastadapters-engine", daemon=True)
        self._metrics = _Metrics()

    # ------------------------------------------------------------------------------------ engine thread

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self.engine.step()

    # ------------------------------------------------------------------------------------ requests

    def adapter_for(self, model) -> str | None:
        if model == self.base_name:
            return None
        if not isinstance(model, str) or model not in self.pool.names():
            raise ApiError(404, f"model {model!r} does not exist; models: {self.models_list()}", "model",
                           code="model_not_found")  # fmt: skip
        return model

    def models_list(self) -> list[str]:
        return [self.base_name, *self.pool.names()]

    def models(self) -> dict:
        resident = {key.split("@")[0] for key in self.pool.resident()}
        data = [{"id": self.base_name, "object": "model", "owned_by": "fastadapters", "type": "base",
                 "resident": True}]  # fmt: skip
        for name in self.pool.names():
            config = self.pool._entries[name].config
            kind = (
                "lora" if isinstance(config, LoraConfig)
                else "bottleneck" if isinstance(config, BottleneckConfig)
                else "prefix" if isinstance(config, PrefixConfig) else type(config).__name__
            )  # fmt: skip
            data.append({"id": name, "object": "model", "owned_by": "fastadapters", "parent": self.base_name,
                         "type": kind, "resident": name in resident})  # fmt: skip
        return {"object": "list", "data": data}

    def resolve_path(self, path) -> str:
        """An adapter folder under the adapter root (no '..', no absolute path elsewhere, no symlink out)."""
        if self.adapter_root is None:
            raise ApiError(
                403, "loading adapters is disabled: start the server with --adapter-root", "lora_path"
            )
        if not isinstance(path, str) or not path:
            raise ApiError(400, "lora_path must be a non-empty string", "lora_path")
        full = os.path.realpath(os.path.join(self.adapter_root, path))
        if os.path.commonpath([full, self.adapter_root]) != self.adapter_root:
            raise ApiError(403, f"lora_path {path!r} is outside the adapter root", "lora_path")
        return full

    def load(self, body: dict) -> str:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or name == self.base_name or "@" in name:
            raise ApiError(
                400, f"lora_name must be a new non-empty name other than {self.base_name!r}", "lora_name"
            )
        full = self.resolve_path(path)
        t0 = time.perf_counter()
        try:
            version = self.pool.register(name, full)
        except (ValueError, TypeError, OSError, KeyError) as e:  # a corrupt or mismatched adapter
            raise ApiError(400, f"cannot load {path!r}: {e}", "lora_path") from None
        self._metrics.load_seconds.observe(time.perf_counter() - t0)
        return f"adapter {name!r} loaded (version {version})"

    def unload(self, body: dict) -> str:
        name = body.get("lora_name")
        if name not in self.pool.names():
            raise ApiError(404, f"adapter {name!r} is not loaded", "lora_name", code="model_not_found")
        self.pool.unregister(name)
        return f"adapter {name!r} unloaded"

    def prompt_ids(self, prompt, param: str = "prompt") -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            ids = list(prompt)
        else:
            raise ApiError(
                400, "prompt must be a string or a list of token ids (one prompt per request)", param
            )
        if not ids:
            raise ApiError(400, "the prompt is empty", param)
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(
                413, f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}", param
            )
        return ids

    def chat_ids(self, messages) -> list[int]:
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                for m in messages
            )
        ):
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a tokenizer without a chat template: a plain transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.prompt_ids(text, "messages")

    def sampling(self, body: dict) -> dict:
        """The engine's keyword arguments from the OpenAI fields, each checked (400 naming the field)."""

        def number(name, default, lo, hi):
            v = body.get(name, default)
            if v is None:
                v = default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ApiError(400, f"{name} must be a number in [{lo}, {hi}], got {v!r}", name)
            return v

        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
        limit = self.engine.max_positions or 4096
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
            raise ApiError(
                400, f"max_tokens must be an integer in [1, {limit}], got {max_tokens!r}", "max_tokens"
            )
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, f"seed must be an integer, got {seed!r}", "seed")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
            raise ApiError(400, f"n must be an integer in [1, 16], got {n!r}", "n")
        return dict(
            max_new_tokens=max_tokens,
            temperature=float(number("temperature", 1.0 if seed is not None else 0.0, 0.0, 2.0)),
            top_p=float(number("top_p", 1.0, 1e-9, 1.0)),
            seed=seed,
            stop_strings=stop,
            n=n,
        )

    async def generate(self, prompt: list[int], adapter, opts: dict, counts: dict | None = None):
        """Yields (choice index, text piece, finish reason or None) as the engine makes tokens; counts[i]
        gets choice i's number of tokens."""
        if self.engine.num_waiting() >= self.max_queue:
            raise ApiError(429, f"the queue is full ({self.max_queue} waiting requests); retry later",
                           kind="rate_limit_error")  # fmt: skip
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handles = []
        stops = opts["stop_strings"]
        hold = max(map(len, stops), default=1) - 1
        try:
            for i in range(opts["n"]):
                seed = None if opts["seed"] is None else opts["seed"] + i

                def listener(token, reason, i=i):
                    loop.call_soon_threadsafe(queue.put_nowait, (i, token, reason))

                try:
                    handles.append(self.engine.add_request(
                        prompt, adapter, opts["max_new_tokens"], temperature=opts["temperature"],
                        top_p=opts["top_p"], seed=seed, listener=listener,
                    ))  # fmt: skip
                except (ValueError, TypeError) as e:
                    raise ApiError(400, str(e)) from None
            self._wake.set()
            self._metrics.requests.labels(self._label(adapter)).inc(len(handles))
            texts, done, started = [""] * len(handles), [False] * len(handles), time.perf_counter()
            last, first = [started] * len(handles), [True] * len(handles)
            while not all(done):
                timeout = self.request_timeout if any(first) else None
                try:
                    i, token, reason = await asyncio.wait_for(queue.get(), timeout)
                except asyncio.TimeoutError:
                    raise ApiError(503, f"not served within the request timeout ({self.request_timeout} s)",
                                   kind="server_error") from None  # fmt: skip
                if done[i]:
                    continue
                if token is not None:
                    now = time.perf_counter()
                    hist = self._metrics.ttft if first[i] else self._metrics.itl
                    hist.labels(self._label(adapter)).observe(now - last[i])
                    first[i], last[i] = False, now
                    self._metrics.tokens.labels(self._label(adapter)).inc()
                    ids = handles[i].output_ids
                    if counts is not None:
                        counts[i] = len(ids)
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    hit = min((text.find(s) for s in stops if s in text), default=-1)
                    if hit >= 0:  # a stop string: the text ends before it, the request ends now
                        self.engine.abort(handles[i])
                        piece, texts[i], done[i] = text[len(texts[i]) : hit], text[:hit], True
                        yield i, piece, "stop"
                        continue
                    # Hold back what a stop string may still complete, and a character whose bytes are not
                    # all out yet.
                    safe = len(text) - hold if not text.endswith("\ufffd") else len(texts[i])
                    if safe > len(texts[i]):
                        piece, texts[i] = text[len(texts[i]) : safe], text[:safe]
                        yield i, piece, None
                if reason is not None:
                    done[i] = True
                    if reason == "error":
                        raise ApiError(500, str(handles[i].error), kind="server_error")
                    text = self.tokenizer.decode(handles[i].output_ids, skip_special_tokens=True)
                    piece, texts[i] = text[len(texts[i]) :], text
                    yield i, piece, "length" if reason == "length" else "stop"
        finally:
            for h in handles:  # a client gone mid-stream (or an error): free the KV blocks and the adapter
                if not h.finished:
                    self.engine.abort(h)
            self._wake.set()

    def _label(self, adapter) -> str:
        return self.base_name if adapter is None else adapter


class _Metrics:
    """Prometheus metrics in their own registry (several servers in one process, e.g. tests, stay apart)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
        self.requests = Counter("fastadapters_requests", "requests", ["adapter"], registry=self.registry)
        self.tokens = Counter(
            "fastadapters_output_tokens", "output tokens", ["adapter"], registry=self.registry
        )
        self.ttft = Histogram("fastadapters_time_to_first_token_seconds", "time to first token", ["adapter"],
                              buckets=buckets, registry=self.registry)  # fmt: skip
        self.itl = Histogram("fastadapters_inter_token_latency_seconds", "inter-token latency", ["adapter"],
                             buckets=buckets, registry=self.registry)  # fmt: skip
        self.load_seconds = Histogram("fastadapters_adapter_load_seconds", "adapter load time",
                                      registry=self.registry)  # fmt: skip


def build_app(server: Server):
    """The FastAPI application of `server` (its engine thread starts with the app, stops with it)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    @asynccontextmanager
    async def lifespan(app):
        server.start()
        yield
        server.stop()

    app = FastAPI(title="fastadapters", lifespan=lifespan)

    def error(e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
        return JSONResponse(body, status_code=e.status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            if server.api_key is not None and request.url.path != "/health":
                if request.headers.get("authorization") != f"Bearer {server.api_key}":
                    raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                   kind="authentication_error")  # fmt: skip
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > server.max_body_bytes:
                raise ApiError(413, f"the request body is over {server.max_body_bytes} bytes")
            return await call_next(request)
        except ApiError as e:
            return error(e)

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > server.max_body_bytes:
            raise ApiError(413, f"the request body is over {server.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def complete(request: Request, chat: bool):
        try:
            body = await body_of(request)
            adapter = server.adapter_for(body.get("model"))
            prompt = server.chat_ids(body.get("messages")) if chat else server.prompt_ids(body.get("prompt"))
            opts = server.sampling(body)
            if len(prompt) + opts["max_new_tokens"] > (server.engine.max_positions or 1 << 30):
                raise ApiError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens exceeds the model's "
                               f"context of {server.engine.max_positions}", "max_tokens")  # fmt: skip
            stream = bool(body.get("stream", False))
            include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        except ApiError as e:
            return error(e)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created, model = int(time.time()), body.get("model")
        obj = "chat.completion" if chat else "text_completion"
        counts: dict = {}
        events = server.generate(prompt, adapter, opts, counts)

        def choice(i, piece, reason, delta: bool):
            if chat:
                key = "delta" if delta else "message"
                content = {"content": piece} if delta else {"role": "assistant", "content": piece}
                return {"index": i, key: content, "finish_reason": reason}
            return {"index": i, "text": piece, "finish_reason": reason, "logprobs": None}

        if stream:
            first = await _first(events)
            if isinstance(first, ApiError):
                return error(first)

            async def sse():
                chunk_obj = "chat.completion.chunk" if chat else "text_completion"
                item = first
                while item is not None:
                    i, piece, reason = item
                    data = {"id": rid, "object": chunk_obj, "created": created, "model": model,
                            "choices": [choice(i, piece, reason, True)]}  # fmt: skip
                    yield f"data: {json.dumps(data)}\n\n"
                    try:
                        item = await events.__anext__()
                    except StopAsyncIteration:
                        item = None
                    except ApiError as e:
                        yield f"data: {json.dumps({'error': {'message': e.message, 'code': e.status}})}\n\n"
                        break
                if include_usage:
                    n_out = sum(counts.values())
                    usage = {"prompt_tokens": len(prompt), "completion_tokens": n_out,
                             "total_tokens": len(prompt) + n_out}  # fmt: skip
                    data = {"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": [],
                            "usage": usage}  # fmt: skip
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        texts, reasons = {}, {}
        try:
            async for i, piece, reason in events:
                texts[i] = texts.get(i, "") + piece
                if reason is not None:
                    reasons[i] = reason
        except ApiError as e:
            return error(e)
        completion = sum(counts.values())
        return {
            "id": rid, "object": obj, "created": created, "model": model,
            "choices": [choice(i, texts[i], reasons.get(i), False) for i in sorted(texts)],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                      "total_tokens": len(prompt) + completion},
        }  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        try:
            body = await body_of(request)
            return PlainTextResponse(await asyncio.to_thread(server.load, body))
        except ApiError as e:
            return error(e)

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        try:
            return PlainTextResponse(server.unload(await body_of(request)))
        except ApiError as e:
            return error(e)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import generate_latest

        return PlainTextResponse(generate_latest(server._metrics.registry).decode())

    return app


async def _first(events):
    """The first event of a stream, or the ApiError raised before it (so it can be a proper status)."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None
    except ApiError as e:
        return e


def demo_server(num_adapters: int = 3, dtype=torch.float32, **kwargs) -> Server:
    """A server on a tiny random Llama with a BPE tokenizer and random adapters (LoRA, series bottleneck,
    prefix): the offline quick start (`fastadapters serve --demo`) and the tests."""
    import copy

    from fastadapters import io, patch
    from fastadapters.demo import build_model, build_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog 0123456789"] * 8
    tokenizer = build_tokenizer(texts, vocab_size=300)
    model = build_model(len(tokenizer), hidden=64, layers=2, seed=0).to(dtype).eval()
    configs = [LoraConfig(r=8, lora_alpha=16), BottleneckConfig(bottleneck_size=16),
               PrefixConfig(num_virtual_tokens=4)]  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    adapters = []
    for i in range(num_adapters):
        config = configs[i % len(configs)]
        tuned = patch.apply(copy.deepcopy(model), config)
        state = {
            key: (torch.randn(value.shape, generator=gen) * 0.3 + (1.0 if value.numel() == 1 else 0.0)).to(
                dtype
            )
            for key, value in io.adapter_state_dict(tuned).items()
        }
        adapters.append((f"demo-{type(config).__name__.removesuffix('Config').lower()}-{i}", state, config))
    pool = AdapterPool(model, max_slots=max(2, num_adapters))
    for name, state, config in adapters:
        pool.register(name, state, config)
    engine = Engine(pool, max_batch_tokens=128, kv_budget_bytes=16 << 20)
    return Server(engine, tokenizer, base_name="demo-base", **kwargs)


def add_arguments(parser):
    """`fastadapters serve`'s options."""
    parser.add_argument("--base-model", help="a HF model folder or hub name (its tokenizer too)")
    parser.add_argument(
        "--demo", action="store_true", help="a tiny random model with 3 random adapters (offline)"
    )
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=PATH", help="an adapter to serve"
    )
    parser.add_argument("--adapter-root", help="folder under which /v1/load_lora_adapter may load adapters")
    parser.add_argument("--max-slots", type=int, default=16, help="adapters resident at once")
    parser.add_argument("--adapter-budget", type=int, default=None, help="bytes of resident adapter weights")
    parser.add_argument("--kv-budget", type=int, default=256 << 20, help="bytes for the KV cache")
    parser.add_argument("--max-batch-tokens", type=int, default=256, help="tokens per engine step")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    parser.add_argument(
        "--request-timeout", type=float, default=60.0, help="seconds to first token before 503"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer <key>")
    return parser


def run(args) -> int:
    """`fastadapters serve`: builds the server from the options and runs uvicorn until SIGTERM/Ctrl-C
    (running requests finish first)."""
    from fastadapters.data import UsageError

    try:
        import uvicorn
    except ImportError:
        raise UsageError("serving needs the serve extra: pip install 'fastadapters[serve]'") from None
    limits = dict(api_key=args.api_key, adapter_root=args.adapter_root, max_queue=args.max_queue,
                  request_timeout=args.request_timeout)  # fmt: skip
    if args.demo:
        server = demo_server(**limits)
    elif not args.base_model:
        raise UsageError("give --base-model PATH_OR_NAME, or --demo")
    else:
        import transformers

        adapters = []
        for spec in args.adapter:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise UsageError(f"--adapter must be NAME=PATH, got {spec!r}")
            adapters.append((name, path))
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.base_model)
            model = transformers.AutoModelForCausalLM.from_pretrained(args.base_model).eval()
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load --base-model {args.base_model!r}: {e}") from None
        try:
            pool = AdapterPool(model, max_slots=args.max_slots, budget_bytes=args.adapter_budget)
            for name, path in adapters:
                pool.register(name, path)
            engine = Engine(pool, max_batch_tokens=args.max_batch_tokens, kv_budget_bytes=args.kv_budget)
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None
        base = os.path.basename(os.path.normpath(args.base_model))
        server = Server(engine, tokenizer, base_name=base, **limits)
    print(
        f"fastadapters serve: models {server.models_list()} on http://{args.host}:{args.port}/v1", flush=True
    )
    # uvicorn drains on SIGTERM (running requests finish, up to 30 s), then raises the signal again once
    # its own handler is gone: this one takes it, so that a drained server exits with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=30)  # fmt: skip
    return 0
