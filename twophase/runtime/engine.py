"""The generation engine: load an artifact, prefill a prompt, decode one token at a time.

    engine = Engine.load("out/smollm2")                    # verifies the manifest and file hashes
    for piece in engine.generate("Hello", max_new_tokens=32): ...
    engine.stats                                           # GenerationStats of the last generate

`prefill` and `decode_one_token` are separate steps (gpt-fast style) that also work on left-padded
batches; `generate_ids` is the token loop (prefill, then sample / decode_one_token until a stop),
and `generate` wraps it with the tokenizer, the chat template, streaming detokenization and stop
strings. The Engine owns the loop; the KVCache owns the K/V state; the Sampler owns randomness.
An Engine runs one generation at a time (it holds one KV cache).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twophase.compiler.errors import ArtifactError, ContextLengthError, TwophaseError
from twophase.compiler.manifest import Manifest, ModelFacts
from twophase.runtime.artifact import load_manifest, max_context, resolve
from twophase.runtime.backend_ort import BoundDecodeStep, GraphOptLevel, OrtPhase
from twophase.runtime.kv_cache import PAST_PREFIX, PRESENT_PREFIX, BoundKVCache, KVCacheBase, make_kv_cache
from twophase.runtime.sampler import Sampler, SamplingParams, SamplingParamsError, seen_mask
from twophase.runtime.stats import GenerationStats
from twophase.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")
BOUND_STEP_INPUTS = ("seqlens_k", "total_sequence_length", "query_seqlens")  # BindKVCachePass's
STOP_TOKEN_REASONS = ("eos", "stop_token")
DEFAULT_PREFILL_CHUNK = 512


class Engine:
    """A loaded artifact: its two phase sessions, KV cache, tokenizer and the generation loop."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        prefill_phase: OrtPhase,
        decode_phase: OrtPhase,
        tokenizer: Tokenizer | None,
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.facts: ModelFacts = manifest.model
        self.tokenizer = tokenizer
        self.prefill_phase = prefill_phase
        self.decode_phase = decode_phase
        self.max_len = max_context(manifest)
        kv = manifest.kv_cache
        self.cache: KVCacheBase | BoundKVCache = make_kv_cache(kv["binding"], self.facts, self.max_len, kv["dtype"])
        self.bound = isinstance(self.cache, BoundKVCache)
        # a bound prompt runs in steps of at most this many tokens (bounded activation memory)
        self.prefill_chunk: int = kv.get("prefill_chunk") or DEFAULT_PREFILL_CHUNK
        # bound decode I/O per (row count, graph), rebuilt per cache allocation
        self._decode_steps: dict[tuple[int, bool], BoundDecodeStep] = {}
        # bound cache: decode steps with at least this many active rows run the prefill graph (None: never)
        self.prefill_graph_from_rows: int | None = None
        self._all_rows = np.ones(0, dtype=np.int64)
        gen = manifest.generation
        self.eos_token_ids: tuple[int, ...] = tuple(gen.get("eos_token_ids") or self.facts.eos_token_ids)
        self.stats = GenerationStats()
        self._epoch = 0  # bumped by every prefill: a generation notices another one took the cache

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        threads: int | None = None,
        device: str = "cpu",
        verify: bool = True,
        opt_level: GraphOptLevel = GraphOptLevel.ENABLE_ALL,
        prepack: bool = True,
    ) -> Engine:
        """Load an artifact directory; `verify` checks every file's sha256 against the manifest first.

        `prepack=False` trades GEMM speed for one shared, memory-mapped copy of the weights
        (see backend_ort.session_options).
        """
        root = Path(path)
        t0 = time.perf_counter()
        manifest = load_manifest(root, verify=verify)
        check_phase_contract(manifest)
        device = getattr(device, "value", device)  # accept compiler.options.Device too
        backends = {manifest.phases[name].backend for name in ("prefill", "decode")}
        if backends == {"tvm"}:
            phases = _load_tvm_phases(root, manifest, threads, device)
            tokenizer = Tokenizer.from_artifact(root, manifest)
            log.info("loaded TVM artifact %s in %.2f s", root, time.perf_counter() - t0)
            return cls(root, manifest, phases["prefill"], phases["decode"], tokenizer)
        phases = {
            name: OrtPhase(
                resolve(root, manifest.phases[name].graph),
                manifest.phases[name],
                name=name,
                threads=threads,
                device=device,
                opt_level=opt_level,
                prepack=prepack,
            )
            for name in ("prefill", "decode")
        }
        tokenizer = Tokenizer.from_artifact(root, manifest)
        log.info("loaded artifact %s in %.2f s", root, time.perf_counter() - t0)
        return cls(root, manifest, phases["prefill"], phases["decode"], tokenizer)

    # --- the two phases -------------------------------------------------------------------------

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, reserve: int = 0
    ) -> np.ndarray:
        """Run the prompt (B, S) through prefill, (re)initializing the KV cache; returns (B, V) last logits.

        Batches are left-padded: `attention_mask` (default all ones) is 0 on padding, and every row's
        last column must be a real token. `reserve` (bound cache) is how many tokens will follow, so the
        buffers are allocated once at their final size.
        """
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
            raise TwophaseError(f"prefill expects non-empty (batch, seq) input_ids, got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.ascontiguousarray(attention_mask, dtype=np.int64)
        if mask.shape != ids.shape:
            raise TwophaseError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
        if not np.all(mask[:, -1] == 1):
            raise TwophaseError("batches must be left-padded: the last column of attention_mask must be all ones")
        if ids.shape[1] > self.max_len:
            raise ContextLengthError(f"prompt of {ids.shape[1]} tokens exceeds the artifact's max_len {self.max_len}")
        if self.bound:
            return self._prefill_bound(ids, mask, reserve)
        position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # (B, S)
        outs = self.prefill_phase.run({"input_ids": ids, "attention_mask": mask, "position_ids": position_ids})
        self.cache.reset()
        self.cache.update(outs, new_mask=mask)
        self._epoch += 1
        return outs["logits"][:, -1, :]

    def _prefill_bound(self, ids: np.ndarray, mask: np.ndarray, reserve: int) -> np.ndarray:
        """Bound cache: each row's real tokens, right-aligned in chunks of prefill_chunk, from position 0."""
        B, S = ids.shape
        lens = mask.sum(axis=1)  # (B,) real tokens per row; left padding means they are the last lens[b]
        if not all(mask[b, S - n :].all() for b, n in enumerate(lens)):
            raise TwophaseError("attention_mask must be 0 on left padding and 1 on every token after it")
        cache = self.cache
        cache.allocate(B, int(lens.max()) + max(reserve, 0))
        self._epoch += 1
        last = np.empty((B, self.facts.vocab_size), dtype=np.float32)
        done = np.zeros(B, dtype=np.int64)
        while (done < lens).any():
            q = np.minimum(lens - done, self.prefill_chunk)  # (B,) this step's tokens per row
            chunk = np.zeros((B, int(q.max())), dtype=np.int64)  # right-padded
            for b in range(B):
                start = S - lens[b] + done[b]
                chunk[b, : q[b]] = ids[b, start : start + q[b]]
            feeds = cache.step_inputs(q)
            feeds["input_ids"] = chunk
            logits = self.prefill_phase.run_bound(feeds, cache)  # (B, 1, V): each row's last valid token
            finished = (q > 0) & (done + q == lens)
            last[finished] = logits[finished, -1]
            cache.advance(q)
            done += q
        return last

    # --- slots (bound cache): rows that start and finish independently (continuous batching) --------

    def start_slots(self, batch: int, capacity: int) -> None:
        """An empty bound cache of `batch` rows (slots) with room for `capacity` positions each."""
        if not self.bound:
            raise TwophaseError("slots need a bound KV cache; recompile the artifact with --kv-cache bound")
        self.cache.allocate(batch, min(capacity, self.max_len))
        self._epoch += 1

    def prefill_slot(self, slot: int, prompt_ids: Sequence[int] | np.ndarray, *, reserve: int = 0) -> np.ndarray:
        """Prefill one prompt into row `slot` of the cache, replacing what the row held; the other rows are
        untouched. Returns the (V,) logits of the prompt's last token. `reserve`: tokens that will follow."""
        cache = self.cache
        if not self.bound or cache.batch_size == 0:
            raise TwophaseError("prefill_slot needs slots: call start_slots first")
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise TwophaseError("empty prompt: generation needs at least one prompt token")
        self.check_context(int(ids.size), max(reserve, 0))
        if not 0 <= slot < cache.batch_size:
            raise TwophaseError(f"slot {slot} is outside the cache's {cache.batch_size} slots")
        cache.ensure_capacity(int(ids.size) + max(reserve, 0))
        cache.lengths[slot] = 0
        logits = None
        done = 0
        while done < ids.size:
            q = np.array([min(ids.size - done, self.prefill_chunk)], dtype=np.int64)
            feeds = {
                "input_ids": ids[None, done : done + int(q[0])],
                "seqlens_k": np.array([done + q[0] - 1], dtype=np.int32),
                "total_sequence_length": np.array(done + q[0], dtype=np.int32),
                "query_seqlens": q.astype(np.int32),
            }
            logits = self.prefill_phase.run_bound(feeds, cache, row=slot)
            done += int(q[0])
        cache.lengths[slot] = ids.size
        return logits[0, -1]

    def decode_one_token(self, token_ids: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        """Feed one token per row (B,) against the cache; returns (B, V) logits of the next position.

        `active` (B,) bool, bound cache only: rows that are False are left unchanged (their logits are
        meaningless), so finished rows of a batch stop growing.
        """
        cache = self.cache
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1, 1)  # (B, 1)
        if ids.shape[0] != cache.batch_size:
            raise TwophaseError(f"decode_one_token got {ids.shape[0]} tokens for a cache of batch {cache.batch_size}")
        if self.bound:
            if active is None and ids.size == 1 and (logits := self._decode_one_row(int(ids[0, 0]))) is not None:
                return logits
            cache.reserve(1)
            if self._decode_steps and next(iter(self._decode_steps.values())).version != cache.version:
                self._decode_steps.clear()
            B = cache.batch_size
            if len(self._all_rows) != B:
                self._all_rows = np.ones(B, dtype=np.int64)
            q = self._all_rows if active is None else np.asarray(active, dtype=np.int64)
            if q.shape != (B,):
                raise TwophaseError(f"active has shape {q.shape}, expected ({B},)")
            # Run only up to the last active row: an idle tail costs nothing (rows are batch-major).
            n = B if active is None else int(np.flatnonzero(q)[-1]) + 1 if q.any() else 1
            # At large batch a decode step is compute-bound: the prefill graph (e.g. w8a8 integer GEMMs) can
            # beat the decode graph's weight-only GEMVs (opt-in: the rows then follow the prefill scheme).
            use_prefill = self.prefill_graph_from_rows is not None and int(q.sum()) >= self.prefill_graph_from_rows
            phase = self.prefill_phase if use_prefill else self.decode_phase
            step = self._decode_steps.get((n, use_prefill))
            if step is None:
                step = self._decode_steps[(n, use_prefill)] = phase.decode_step(cache, self.facts.vocab_size, n)
            logits = step.run(ids[:n, 0], cache.lengths[:n] + q[:n], q[:n])
            cache.advance(q)
            if n == B:
                return logits
            out = np.zeros((B, logits.shape[1]), dtype=logits.dtype)
            out[:n] = logits
            return out
        feeds = cache.feeds()
        feeds["input_ids"] = ids
        feeds["attention_mask"] = cache.next_attention_mask()  # (B, T+1)
        feeds["position_ids"] = cache.next_position_ids()  # (B, 1)
        outs = self.decode_phase.run(feeds)
        cache.update(outs)
        return outs["logits"][:, -1, :]

    def _decode_one_row(self, token: int) -> np.ndarray | None:
        """decode_one_token for a one-row bound cache with room for the token, through a step that takes plain
        integers (TvmDecodeStep.run_one); None where that does not apply (no such step yet, a new cache, a full
        one, or the prefill graph serving single rows), leaving everything as it was."""
        cache = self.cache
        step = self._decode_steps.get((1, False))
        run_one = getattr(step, "run_one", None)
        if run_one is None or step.version != cache.version or cache.batch_size != 1:
            return None
        if self.prefill_graph_from_rows is not None and self.prefill_graph_from_rows <= 1:
            return None
        length = int(cache.lengths[0])
        if length >= cache.capacity:
            return None
        logits = run_one(token, length + 1)
        if logits is not None:
            cache.lengths[0] = length + 1
        return logits

    # --- the token loop -------------------------------------------------------------------------

    def generate_ids(
        self,
        prompt_ids: Sequence[int] | np.ndarray,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
    ) -> Generator[int, None, None]:
        """Generated token ids of one prompt, lazily; stops after an eos / stop token (yielded last, as
        transformers' generate returns it) or after max_new_tokens. Needs no tokenizer.

        Everything is validated here, before anything runs; the returned generator does the work.
        """
        t_start = time.perf_counter()
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, tuple(stop_token_ids or ()), seed)
        ids = self._check_request(prompt_ids, max_new_tokens)
        return self._token_loop(ids, params, max_new_tokens, t_start)

    def generate_batch_ids(
        self,
        prompts: Sequence[Sequence[int] | np.ndarray],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
    ) -> list[list[int]]:
        """Generate for several prompts of any lengths at once; row i's tokens are those prompt i gives
        alone (each row has its own sampler with `seed`, its own stop). Rows that stop early stay idle
        (bound cache: their cache is left unchanged) while the others finish.
        """
        if not prompts:
            raise TwophaseError("generate_batch_ids needs at least one prompt")
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, tuple(stop_token_ids or ()), seed)
        rows = [self._check_request(p, max_new_tokens) for p in prompts]
        B, S = len(rows), max(r.size for r in rows)
        stats = self.stats = GenerationStats(prompt_tokens=sum(int(r.size) for r in rows))
        out: list[list[int]] = [[] for _ in rows]
        if max_new_tokens == 0:
            stats.stop_reason = "max_new_tokens"
            return out
        ids = np.zeros((B, S), dtype=np.int64)
        mask = np.zeros((B, S), dtype=np.int64)
        for b, r in enumerate(rows):  # left-padded
            ids[b, S - r.size :], mask[b, S - r.size :] = r, 1
        samplers = [Sampler(params) for _ in rows]
        seen = [seen_mask(r[None], self.facts.vocab_size) if params.uses_penalty else None for r in rows]
        stops = frozenset(self.eos_token_ids) | frozenset(params.stop_token_ids)
        active = np.ones(B, dtype=bool)
        token = np.zeros(B, dtype=np.int64)
        clock = time.perf_counter
        t0 = clock()
        logits = self.prefill(ids, mask, reserve=max_new_tokens)
        stats.prefill_s = stats.ttft_s = clock() - t0
        for step in range(max_new_tokens):
            if step > 0:
                t0 = clock()
                logits = self.decode_one_token(token, active=active if self.bound else None)
                stats.decode_s += clock() - t0
                stats.decode_steps += 1
            token = np.zeros(B, dtype=np.int64)
            for b in np.flatnonzero(active):
                tok = int(samplers[b].sample(logits[b : b + 1], seen[b])[0])
                token[b] = tok
                out[b].append(tok)
                stats.generated_tokens += 1
                if seen[b] is not None:
                    seen[b][0, tok] = True
                if tok in stops:
                    active[b] = False
            if not active.any():
                break
        stats.stop_reason = "max_new_tokens" if active.any() else "eos"
        return out

    def _check_request(self, prompt_ids: Sequence[int] | np.ndarray, max_new_tokens: int) -> np.ndarray:
        """The prompt as a (S,) int64 array, after the emptiness, vocabulary and context checks."""
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise TwophaseError("empty prompt: generation needs at least one prompt token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise SamplingParamsError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        vocab = self.facts.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = ids[(ids < 0) | (ids >= vocab)][:5].tolist()
            raise TwophaseError(f"prompt token ids {bad} are outside the vocabulary [0, {vocab})")
        self.check_context(int(ids.size), max_new_tokens)
        return ids

    def check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """ContextLengthError when prompt + max_new_tokens does not fit the artifact's context."""
        if prompt_tokens + max_new_tokens > self.max_len:
            raise ContextLengthError(
                f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} = "
                f"{prompt_tokens + max_new_tokens} exceeds the artifact's maximum context of {self.max_len} "
                "tokens; shorten the prompt or lower max_new_tokens"
            )

    def _token_loop(
        self, ids: np.ndarray, params: SamplingParams, max_new_tokens: int, t_start: float
    ) -> Generator[int, None, None]:
        stats = self.stats = GenerationStats(prompt_tokens=int(ids.size))
        if max_new_tokens == 0:
            stats.stop_reason = "max_new_tokens"
            return
        sampler = Sampler(params)
        eos = frozenset(self.eos_token_ids)
        stop_ids = frozenset(params.stop_token_ids)
        seen = seen_mask(ids[None], self.facts.vocab_size) if params.uses_penalty else None  # (1, V)
        clock = time.perf_counter
        try:
            t0 = clock()
            logits = self.prefill(ids[None], reserve=max_new_tokens)  # (1, V)
            stats.prefill_s = clock() - t0
            epoch = self._epoch
            token = sampler.sample(logits, seen)  # (1,)
            stats.ttft_s = clock() - t_start
            for step in range(max_new_tokens):
                if step > 0:
                    if self._epoch != epoch:
                        raise TwophaseError(
                            "another prefill ran on this Engine during this generation; an Engine holds one "
                            "KV cache, so finish (or close) one generation before starting the next"
                        )
                    t0 = clock()
                    token = sampler.sample(self.decode_one_token(token), seen)
                    stats.decode_s += clock() - t0
                    stats.decode_steps += 1
                tok = int(token[0])
                stats.generated_tokens += 1
                if tok in eos or tok in stop_ids:
                    stats.stop_reason = "eos" if tok in eos else "stop_token"
                    yield tok  # the last id, as transformers' generate returns it
                    return
                if seen is not None:
                    seen[0, tok] = True
                yield tok
            stats.stop_reason = "max_new_tokens"
        finally:
            if stats.stop_reason is None:
                stats.stop_reason = "closed"

    # --- text ------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        chat: bool = False,
        stream: bool = True,
    ) -> Iterator[str] | str:
        """Generate text: an iterator of pieces (stream=True) or the whole string.

        `prompt` is text, token ids, or (chat=True) a user message or a list of {role, content} dicts
        rendered by the chat template. Generation stops at an eos id, a stop token id, a stop string
        (the text ends before it) or after max_new_tokens. Validation and the context check happen
        in this call, before any graph runs.
        """
        t_start = time.perf_counter()
        if self.tokenizer is None:
            raise TwophaseError("this artifact ships no tokenizer: use generate_ids with token ids")
        stops = list(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise SamplingParamsError(f"stop strings must be non-empty strings, got {stops!r}")
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, tuple(stop_token_ids or ()), seed)
        ids = self._check_request(self._prompt_ids(prompt, chat), max_new_tokens)
        tokens = self._token_loop(ids, params, max_new_tokens, t_start)
        pieces = self._text_stream(tokens, stops)
        return pieces if stream else "".join(pieces)

    def _prompt_ids(self, prompt: Any, chat: bool) -> list[int]:
        assert self.tokenizer is not None
        if chat:
            if isinstance(prompt, str):
                messages: list[Mapping[str, Any]] = [{"role": "user", "content": prompt}]
            elif isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
                messages = list(prompt)
            else:
                raise TwophaseError("with chat=True the prompt must be a string or a list of {role, content} dicts")
            if not messages:
                raise TwophaseError("empty prompt: the conversation has no messages")
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        if isinstance(prompt, str):
            if not prompt:
                raise TwophaseError("empty prompt: generation needs at least one prompt token")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (Sequence, np.ndarray)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return [int(t) for t in prompt]
        raise TwophaseError("prompt must be a string or a list of token ids (or pass chat=True for messages)")

    def _text_stream(self, tokens: Generator[int, None, None], stops: list[str]) -> Generator[str, None, None]:
        assert self.tokenizer is not None
        detok = self.tokenizer.detokenizer()
        matcher = StopStrings(stops)
        try:
            for tok in tokens:
                if self.stats.stop_reason in STOP_TOKEN_REASONS:
                    break  # the stop token itself is not part of the text
                piece = detok.add(tok)
                if not piece:
                    continue
                out, hit = matcher.feed(piece)
                if out:
                    yield out
                if hit:
                    self.stats.stop_reason = "stop_string"
                    return
            out, hit = matcher.feed(detok.flush())
            if hit:
                self.stats.stop_reason = "stop_string"
            else:
                out += matcher.flush()
            if out:
                yield out
        finally:
            tokens.close()  # runs the token loop's bookkeeping (stop reason) now


class StopStrings:
    """Finds stop strings in streamed text, holding back any suffix that could begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.max_hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found: the text then ends right before it)."""
        if not self.stops:
            return piece, False
        text = self.pending + piece
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        hold = self._partial_suffix(text)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _partial_suffix(self, text: str) -> int:
        for k in range(min(self.max_hold, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


def _load_tvm_phases(root: Path, manifest: Manifest, threads: int | None, device: str) -> dict:
    from twophase.runtime.backend_tvm import TvmPhase, TvmWeights

    if device != "cpu":
        raise TwophaseError(f"this artifact was compiled by TVM for the CPU; it cannot run on {device!r}")
    if manifest.kv_cache.get("binding") != "bound":
        raise ArtifactError("a TVM artifact needs the bound KV cache; recompile it")
    weights = TvmWeights(root)  # both phases share one copy of every weight they both read
    return {
        name: TvmPhase(root, manifest.phases[name], name=name, threads=threads, weights=weights)
        for name in ("prefill", "decode")
    }


def check_phase_contract(manifest: Manifest) -> None:
    """The phases take and return what the loop feeds and reads (names from DESIGN.md's contract)."""
    facts = manifest.model
    outputs = ["logits", *facts.kv_names(PRESENT_PREFIX)]
    if manifest.kv_cache["binding"] == "bound":
        bound = ["input_ids", *BOUND_STEP_INPUTS, *facts.kv_names(PAST_PREFIX)]
        want = {"prefill": (bound, outputs), "decode": (bound, outputs)}
    else:
        want = {
            "prefill": (list(STEP_INPUTS), outputs),
            "decode": ([*STEP_INPUTS, *facts.kv_names(PAST_PREFIX)], outputs),
        }
    for phase, (inputs, outputs) in want.items():
        entry = manifest.phases[phase]
        have_in = {t.name for t in entry.inputs}
        have_out = {t.name for t in entry.outputs}
        missing = [n for n in inputs if n not in have_in] + [n for n in outputs if n not in have_out]
        extra = sorted(have_in - set(inputs))
        if missing or extra:
            raise ArtifactError(
                f"phases.{phase}: missing tensors {missing}, unexpected inputs {extra} for a "
                f"{facts.num_layers}-layer model; recompile the artifact"
            )
