"""The serving engine: continuous batching of requests over mixed adapters, with a paged KV cache.

    engine = Engine(bank, max_batch_tokens=256, max_seqs=32, kv_budget_bytes=64 << 20)
    handle = engine.add_request(prompt_ids, adapter="math", max_new_tokens=32, temperature=0.7, seed=1)
    engine.run_until_done()          # or engine.step() in a loop; or a thread calling step()
    handle.output_ids                # also: `for token in handle: ...` streams the tokens as they come

Iteration-level scheduling: each `step()` runs one forward of the model over one packed batch that holds
one decode token of every running sequence and prefill chunks of new ones (chunked prefill, up to
max_batch_tokens tokens in all). Requests added between steps join the next step; nothing waits for a
whole batch to finish. The adapters come from an AdapterBank (LoRA of any ranks, series and parallel
bottleneck adapters, prefix tuning, mixed in one step): each packed token carries its sequence's adapter,
so every wrapped linear layer runs one multi-adapter op for the step, and attention runs over the paged
KV cache with each sequence's own prefix (fastadapters/serving/attention.py).

KV cache: preallocated blocks (kv_cache.PagedKVCache). When blocks run out, the newest running request is
preempted: its blocks are freed and it is recomputed later from its prompt and the tokens it already
produced (nothing is dropped, and greedy or seeded outputs are unchanged).

Sampling: greedy (temperature 0), temperature, top-k and top-p, with a torch.Generator per request seeded
from `seed`, so a request's tokens do not depend on what it was batched with.

Adapters: the bank's loaded ones (a request whose adapter is removed while it runs ends with an error), or
with an AdapterPool (pool.py) its registered ones, made resident when a request is admitted.
Not yet (see issue 14): the schedule built on the device, and a Triton kernel for the paged attention.
"""

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastadapters.bank import AdapterBank, _Request
from fastadapters.families import attention_paths, kv_shape
from fastadapters.ops.multi_lora import adapter_schedule
from fastadapters.serving.attention import PackedBatch, pad_prefixes, paged_attention
from fastadapters.serving.kv_cache import PagedKVCache
from fastadapters.serving.pool import AdapterPool


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0: greedy; top_k 0: no top-k cut; top_p 1: no nucleus cut; seed: the generator's seed."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


class RequestHandle:
    """A request in the engine: its tokens so far (`output_ids`), `finished`, `finish_reason` ("length",
    "stop", "abort" or "error") and `error`. Iterating it yields the new tokens as the engine makes them
    (blocking until the next one, from another thread than the one stepping the engine)."""

    def __init__(self, request_id: int, prompt: list, adapter, max_new_tokens: int, params, stop):
        self.request_id = request_id
        self.prompt = prompt
        self.adapter = adapter
        self.max_new_tokens = max_new_tokens
        self.params = params
        self.stop = stop
        self.output_ids: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self._cond = threading.Condition()
        # Called from the engine's thread as listener(token or None, finish reason or None) after each
        # change (the server forwards them to its event loop).
        self.listeners: list = []

    def _push(self, token: int | None = None, reason: str | None = None, error: Exception | None = None):
        with self._cond:
            if token is not None:
                self.output_ids.append(token)
            if reason is not None:
                self.finished, self.finish_reason, self.error = True, reason, error
            self._cond.notify_all()
        for listener in self.listeners:
            listener(token, reason)

    def __iter__(self):
        seen = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda n=seen: len(self.output_ids) > n or self.finished)
                new, done = self.output_ids[seen:], self.finished
            yield from new
            seen += len(new)
            if done and seen == len(self.output_ids):
                return

    def result(self, timeout: float | None = None) -> list[int]:
        """Waits until the request finishes; returns its tokens (raises the error of a failed request)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.finished, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.output_ids)


@dataclass(eq=False)
class _Sequence:
    handle: RequestHandle
    arrival: int
    generator: torch.Generator | None
    computed: int = 0  # tokens whose keys are in the cache
    key: str | None = None  # the adapter's name in the bank, once admitted (the pool's "name@version")
    tokens: list = field(default_factory=list)  # prompt + outputs: what the cache must hold

    @property
    def pending(self) -> int:
        """Tokens to run before the next sample (the rest of the prompt, or the last output)."""
        return len(self.tokens) - self.computed


class _PackedRequest(_Request):
    """The bank's request for one packed step: one adapter id per token, attention through the engine."""

    def __init__(self, state, token_adapters: Tensor, attend):
        super().__init__(state, token_adapters)
        self.attend = attend

    def schedule(self, x: Tensor):
        key = (tuple(x.shape[:-1]), x.device)
        sched = self.schedules.get(key)
        if sched is None:
            ids = self.adapter_ids.to(x.device).view(x.shape[:-1])
            sched = self.schedules[key] = adapter_schedule(ids, len(self.state.names))
        return sched


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class Engine:
    """Continuous batching over an AdapterBank's model (see the module docstring).

    bank: an AdapterBank (or a HF causal LM, wrapped in a new one), or an AdapterPool (requests then name
    its registered adapters, made resident as they are admitted); max_batch_tokens: tokens per step
    (decode tokens plus prefill chunks); max_seqs: sequences running at once (default: 32, at most
    max_batch_tokens); max_active_adapters: distinct
    adapters among them (None: no limit); kv_budget_bytes or num_blocks: the KV cache's size; block_size:
    positions per block; eos_token_id: ends a request (default: the model's generation config).
    """

    def __init__(
        self,
        bank,
        *,
        pool=None,
        max_batch_tokens: int = 256,
        max_seqs: int | None = None,
        max_active_adapters: int | None = None,
        kv_budget_bytes: int | None = None,
        num_blocks: int | None = None,
        block_size: int = 16,
        eos_token_id=None,
    ):
        if isinstance(bank, AdapterPool):
            pool, bank = bank, bank.bank
        elif not isinstance(bank, AdapterBank):
            bank = getattr(bank, "fastadapters_bank", None) or AdapterBank(bank)
        if pool is not None and pool.bank is not bank:
            raise ValueError("pool must be an AdapterPool over the engine's bank")
        self.bank, self.pool = bank, pool
        model = bank.model
        self.model = model
        self.max_batch_tokens = _positive_int("max_batch_tokens", max_batch_tokens)
        max_seqs = min(32, max_batch_tokens) if max_seqs is None else max_seqs
        self.max_seqs = _positive_int("max_seqs", max_seqs)
        if max_seqs > max_batch_tokens:
            raise ValueError(f"max_seqs ({max_seqs}) must be <= max_batch_tokens ({max_batch_tokens})")
        self.max_active_adapters = (
            None if max_active_adapters is None else _positive_int("max_active_adapters", max_active_adapters)
        )
        cfg = model.config
        if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "final_logit_softcapping", None):
            raise NotImplementedError(f"Engine: {cfg.model_type} uses logit soft-capping, not supported yet")
        paths, route = attention_paths(model)
        if route != "registry":
            raise NotImplementedError(
                f"Engine: {cfg.model_type}'s attention does not go through transformers' attention interface"
            )
        self._layer = {}
        for i, path in enumerate(paths):
            self._layer[path] = i
        kv_heads, head_dim = kv_shape(model, model.get_submodule(paths[0]))
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        per_block = PagedKVCache.bytes_per_block(len(paths), kv_heads, head_dim, block_size, self.dtype)
        if num_blocks is None:
            if kv_budget_bytes is None:
                raise ValueError("give kv_budget_bytes (bytes for the KV cache) or num_blocks")
            num_blocks = _positive_int("kv_budget_bytes", kv_budget_bytes) // per_block
            if num_blocks < 1:
                raise ValueError(
                    f"kv_budget_bytes={kv_budget_bytes} holds no block of {block_size} positions "
                    f"({per_block} bytes each)"
                )
        self.cache = PagedKVCache(
            len(paths), kv_heads, head_dim, num_blocks=num_blocks, block_size=block_size, dtype=self.dtype,
            device=self.device,
        )  # fmt: skip
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.vocab_size = cfg.vocab_size
        eos = model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
        self.eos = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
        bank._route_attention(paths)
        self._lock = threading.Lock()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._aborted: set[int] = set()
        self._ids = itertools.count()
        # steps run, preemptions, tokens run, seconds in step() and in its scheduling and packing
        self.stats = {"steps": 0, "preemptions": 0, "tokens": 0, "step_s": 0.0, "schedule_s": 0.0}

    # ------------------------------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt_ids,
        adapter: str | None = None,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop=None,
        listener=None,
    ) -> RequestHandle:
        """Queues a request; it joins the next step. Returns its handle. Everything is checked here: a bad
        request raises and leaves the engine as it was. listener(token, finish_reason), if given, is called
        from the stepping thread after each new token and at the end."""
        if isinstance(prompt_ids, Tensor):
            if prompt_ids.dim() != 1 or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
                raise ValueError(
                    f"prompt_ids must be a 1-D integer tensor, got {prompt_ids.dtype} of shape "
                    f"{tuple(prompt_ids.shape)}"
                )
            prompt_ids = prompt_ids.tolist()
        if not isinstance(prompt_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids
        ):
            raise TypeError("prompt_ids must be a list of token ids (ints) or a 1-D integer tensor")
        if not prompt_ids:
            raise ValueError("prompt_ids must hold at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids must be in [0, {self.vocab_size}) (the vocabulary), got {bad[:5]}")
        _positive_int("max_new_tokens", max_new_tokens)
        if adapter is not None and adapter not in self._known():
            raise ValueError(f"unknown adapter {adapter!r}; adapters: {self._known()}")
        total = len(prompt_ids) + max_new_tokens
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                f"the model's context of {self.max_positions} positions"
            )
        if self.cache.blocks_for(total) > self.cache.num_blocks:
            raise ValueError(
                f"prompt + max_new_tokens = {total} tokens can never fit the KV cache "
                f"({self.cache.num_blocks} blocks of {self.cache.block_size})"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        _positive_int("top_k", top_k, minimum=0)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        stop = frozenset() if stop is None else frozenset(stop)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop):
            raise TypeError(f"stop must be a collection of token ids (ints), got {stop!r}")
        params = SamplingParams(float(temperature), float(top_p), top_k, seed)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        with self._lock:
            rid = next(self._ids)
            handle = RequestHandle(rid, list(prompt_ids), adapter, max_new_tokens, params, stop)
            if listener is not None:
                handle.listeners.append(listener)
            self._waiting.append(_Sequence(handle, rid, generator, tokens=list(prompt_ids)))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Ends a request at the next step (its tokens so far stay in the handle; reason "abort")."""
        with self._lock:
            self._aborted.add(handle.request_id)

    def _known(self) -> list:
        """The adapter names requests may use: the pool's registered ones, else the bank's loaded ones."""
        return self.bank.names() if self.pool is None else self.pool.names()

    def num_waiting(self) -> int:
        """Requests queued and not yet admitted (preempted ones included)."""
        with self._lock:
            return len(self._waiting)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    def run_until_done(self) -> None:
        """Steps until no request is waiting or running."""
        while self.has_work():
            self.step()

    # ------------------------------------------------------------------------------------------ schedule

    def _finish(self, seq: _Sequence, reason: str, error: Exception | None = None) -> None:
        self.cache.free(seq.arrival)
        if self.pool is not None and seq.key is not None:
            self.pool.release(seq.key)
        seq.key = None
        seq.handle._push(reason=reason, error=error)

    def _preempt(self, seq: _Sequence) -> None:
        """Frees seq's blocks; it is recomputed later from its prompt and outputs so far."""
        self._running.remove(seq)
        self.cache.free(seq.arrival)
        seq.computed = 0
        self._waiting.appendleft(seq)
        self.stats["preemptions"] += 1

    def _schedule(self) -> list[tuple[_Sequence, int]]:
        """[(sequence, tokens to run this step)]: decodes first, then prefill chunks, then new requests."""
        with self._lock:
            for seq in [s for s in (*self._running, *self._waiting) if s.handle.request_id in self._aborted]:
                (self._running if seq in self._running else self._waiting).remove(seq)
                self._finish(seq, "abort")
            self._aborted.clear()
            loaded, known = set(self.bank.names()), set(self._known())
            for seq in [
                s for s in (*self._running, *self._waiting)
                if s.handle.adapter is not None
                and (s.key not in loaded if s.key is not None else s.handle.adapter not in known)
            ]:  # fmt: skip
                (self._running if seq in self._running else self._waiting).remove(seq)
                self._finish(seq, "error", KeyError(f"adapter {seq.handle.adapter!r} was removed"))
            budget = self.max_batch_tokens
            plan = []
            for seq in sorted(self._running, key=lambda s: s.pending):
                n = min(seq.pending, budget)
                if n == 0:
                    continue
                # Blocks for this chunk; when they run out, the newest running request gives its blocks back.
                while not self.cache.can_allocate(seq.arrival, seq.computed + n):
                    victim = max(self._running, key=lambda s: s.arrival)
                    self._preempt(victim)
                    plan = [(s, k) for s, k in plan if s is not victim]
                    if victim is seq:
                        break
                if seq not in self._running:
                    continue
                self.cache.allocate(seq.arrival, seq.computed + n)
                plan.append((seq, n))
                budget -= n
            active = {s.key for s in self._running if s.key is not None}
            while self._waiting and budget > 0 and len(self._running) < self.max_seqs:
                seq = self._waiting[0]
                adapter = seq.handle.adapter
                n = min(seq.pending, budget)
                if not self.cache.can_allocate(seq.arrival, seq.computed + n):
                    break
                if adapter is not None and seq.key is None:
                    key = adapter if self.pool is None else f"{adapter}@{self.pool.version(adapter)}"
                    if (
                        key not in active
                        and self.max_active_adapters is not None
                        and len(active) >= self.max_active_adapters
                    ):
                        break  # first come, first served: later requests wait behind it
                    seq.key = adapter if self.pool is None else self.pool.acquire(adapter)
                    if seq.key is None:
                        break  # no room in the pool until a running request releases its adapter
                self._waiting.popleft()
                self.cache.allocate(seq.arrival, seq.computed + n)
                self._running.append(seq)
                if seq.key is not None:
                    active.add(seq.key)
                plan.append((seq, n))
                budget -= n
            return plan

    def _pack(self, plan, index: dict) -> PackedBatch:
        ids, positions, adapters, write, read, q_starts, context, seq_adapters, rows, tables = (
            [], [], [], [], [], [0], [], [], [], []
        )  # fmt: skip
        for seq, n in plan:
            a = -1 if seq.key is None else index[seq.key]
            start = seq.computed
            ids += seq.tokens[start : start + n]
            positions += range(start, start + n)
            adapters += [a] * n
            write.append(self.cache.slots(seq.arrival, start, start + n))
            read.append(self.cache.slots(seq.arrival, 0, start + n))
            context.append(start)
            seq_adapters.append(a)
            q_starts.append(q_starts[-1] + n)
            tables.append(list(self.cache.tables[seq.arrival]))
            if start + n == len(seq.tokens):
                rows.append(q_starts[-1] - 1)
        dev = self.device
        as_tensor = lambda v: torch.tensor(v, dtype=torch.int64, device=dev)  # noqa: E731
        return PackedBatch(
            as_tensor(ids), as_tensor(positions), as_tensor(adapters), q_starts, context, seq_adapters,
            torch.cat(write).to(dev), [r.to(dev) for r in read], as_tensor(rows), tables,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ step

    def step(self) -> int:
        """Runs one iteration: schedules, runs one forward of the packed batch, samples, streams the new
        tokens. Returns the number of tokens the forward ran (0 when there was nothing to do)."""
        start = time.perf_counter()
        plan = self._schedule()
        if not plan:
            return 0
        state = self.bank._state
        batch = self._pack(plan, state.index)
        self.stats["schedule_s"] += time.perf_counter() - start
        prefixes = {}

        def attend(module, path, query, key, value, scaling, kwargs):
            layer = self._layer[path]
            k_cache, v_cache = self.cache.keys[layer], self.cache.values[layer]
            k_cache[batch.write_slots] = key[0].transpose(0, 1).to(k_cache.dtype)
            v_cache[batch.write_slots] = value[0].transpose(0, 1).to(v_cache.dtype)
            if path not in prefixes:
                prefixes[path] = pad_prefixes(_prefixes(state, path, batch.seq_adapters), k_cache)
            out = paged_attention(
                query[0].transpose(0, 1), k_cache, v_cache, batch, scaling, prefixes[path],
                kwargs.get("sliding_window"),
            )  # fmt: skip
            return out.unsqueeze(0)

        req = _PackedRequest(state, batch.token_adapters, attend)
        logits = self.bank._run(
            req,
            lambda: self.model(
                input_ids=batch.input_ids[None], position_ids=batch.positions[None], use_cache=False,
                logits_to_keep=batch.logits_rows,
            ).logits[0],
        )  # fmt: skip
        row = 0
        for seq, n in plan:
            seq.computed += n
            if seq.computed < len(seq.tokens):
                continue  # a prefill chunk that does not reach the end of the prompt: nothing to sample
            token = _sample(logits[row], seq.handle.params, seq.generator)
            row += 1
            seq.tokens.append(token)
            seq.handle._push(token)
            out = seq.handle.output_ids
            reason = None
            if token in self.eos or token in seq.handle.stop:
                reason = "stop"
            elif len(out) >= seq.handle.max_new_tokens:
                reason = "length"
            if reason is not None:
                with self._lock:
                    self._running.remove(seq)
                self._finish(seq, reason)
        self.stats["steps"] += 1
        self.stats["tokens"] += batch.num_tokens
        self.stats["step_s"] += time.perf_counter() - start
        return batch.num_tokens


def _prefixes(state, path: str, seq_adapters: list) -> list:
    """Each sequence's prefix (key, value) [P, Hkv, D] at attention module `path`, or None."""
    stacks = state.prefixes.get(path, ())
    out = []
    for a in seq_adapters:
        hit = next(((st, st.rows[a]) for st in stacks if a in st.rows), None)
        out.append(
            None
            if hit is None
            else (hit[0].key[hit[1]].transpose(0, 1), hit[0].value[hit[1]].transpose(0, 1))
        )
    return out


def _sample(logits: Tensor, params: SamplingParams, generator) -> int:
    """One token from a row of logits: greedy at temperature 0, else top-k / top-p sampling."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
