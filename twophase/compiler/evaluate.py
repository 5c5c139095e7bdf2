"""Accuracy of a compiled artifact, per phase: perplexity, greedy agreement and KL vs an fp32 reference.

    report = evaluate_artifact("out/smollm2-w4", "out/smollm2-fp32")
    print(report.format())            # or report.to_dict() for JSON

Each phase is measured with its own graph, so its own quantization scheme:

- prefill scheme: the artifact's prefill.onnx scores whole windows. That graph emits the last
  position's logits only (SplitPhasesPass slices the hidden states before the lm_head), so an
  in-memory variant without that Slice is built (`full_logits_model`); everything else, weights
  included, is the artifact's own. Windows: `corpus.eval_windows(ids, windows, length)`.
- TVM artifacts (no ONNX graph inside) run their prefill library teacher-forced, one token per step
  (`_run_prefill_steps`): the same per-row arithmetic as the whole window at once.
- decode scheme: the artifact's decode.onnx runs teacher-forced from an empty cache (past length 0),
  one token per step; the decode windows are `decode_windows` of the evaluation windows, evenly
  picked (indices linspace(0, windows - 1, decode_windows) truncated), cut to their first
  `decode_length` tokens (defaults 8 x 256), all run as one batch: a batch-8 decode step costs
  little more than a batch-1 step, so this takes tens of seconds on SmolLM2. The artifact's
  prefill-scheme PPL on exactly those tokens is reported beside it (`prefill_scheme_ppl`), so the
  two phases can be compared directly.

Against a reference artifact (an fp32 compile of the same model) each phase also gets: the
reference's PPL on the same tokens and dPPL % = 100 * (ppl / ref_ppl - 1); greedy agreement = the
fraction of predicted positions where argmax(artifact logits) == argmax(reference logits); and the
mean KL(reference || artifact) per position in nats. The reference logits are the reference's
prefill-scheme (full-window) logits for both phases: for an fp32 reference its two graphs agree to
float rounding, and one reference pass serves both phases.

Perplexity = exp(mean NLL) over the predicted tokens (length - 1 per window, each window scored
from its own first token). Sessions use the runtime's session options (graph optimizations on),
so the numbers are those of deployment. Memory: one window's logits at a time, plus (with a
reference) the reference's log-probs on the decode tokens, decode_windows x decode_length x vocab
float32 (400 MB for SmolLM2 at the defaults). Compile-side tool: it needs onnx_ir, which the runtime
package does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from twophase.compiler import corpus
from twophase.compiler.errors import ArtifactError, ContextLengthError, TwophaseError
from twophase.compiler.lower_tvm import gemv_rows_for
from twophase.compiler.manifest import Manifest
from twophase.passes.split_phases import find_last_position_slice
from twophase.runtime.artifact import load_manifest, max_context, resolve, tokenizer_paths
from twophase.runtime.backend_ort import GraphOptLevel, OrtPhase, session_options
from twophase.runtime.kv_cache import PAST_PREFIX, PRESENT_PREFIX, BoundKVCache

log = logging.getLogger(__name__)

DEFAULT_DECODE_WINDOWS = 8
DEFAULT_DECODE_LENGTH = 256

_INT64_MAX = np.iinfo(np.int64).max


# ---------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class PhaseEval:
    """One phase's accuracy. Reference fields are None without a reference artifact."""

    phase: str
    scheme: str
    windows: int
    length: int
    predicted_tokens: int
    ppl: float
    seconds: float
    reference_ppl: float | None = None  # the reference's PPL on the same tokens
    dppl_pct: float | None = None  # 100 * (ppl / reference_ppl - 1)
    agreement: float | None = None  # fraction of positions with the reference's argmax
    mean_kl: float | None = None  # mean KL(reference || artifact) per position, nats
    prefill_scheme_ppl: float | None = None  # decode only: the artifact's prefill PPL on the same tokens


@dataclasses.dataclass
class EvalReport:
    artifact: str
    reference: str | None
    corpus: dict[str, Any]  # name, sha256, tokens
    threads: int
    prefill: PhaseEval
    decode: PhaseEval | None
    kv_cache: dict[str, Any] = dataclasses.field(default_factory=dict)  # the artifact's binding and dtype

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """A short human-readable table."""
        c = self.corpus
        lines = [
            f"artifact   {self.artifact}",
            f"reference  {self.reference or '(none)'}",
            f"corpus     {c['name']}: {c['tokens']} tokens, sha256 {c['sha256'][:12]}, {self.threads} threads",
            f"kv cache   {self.kv_cache.get('binding', '?')} binding, {self.kv_cache.get('dtype', '?')}",
            "",
            (
                f"{'phase':<8} {'scheme':<7} {'windows':>9} {'tokens':>7} {'PPL':>9} {'ref PPL':>9} "
                f"{'dPPL':>8} {'agree':>8} {'KL':>8} {'time':>7}"
            ),
        ]
        for p in (self.prefill, self.decode):
            if p is None:
                continue
            lines.append(
                f"{p.phase:<8} {p.scheme:<7} {f'{p.windows}x{p.length}':>9} {p.predicted_tokens:>7} "
                f"{p.ppl:>9.4f} {_fmt(p.reference_ppl, '9.4f')} {_fmt(p.dppl_pct, '+7.2f', '%')} "
                f"{_fmt(None if p.agreement is None else 100 * p.agreement, '7.2f', '%')} "
                f"{_fmt(p.mean_kl, '8.5f')} {p.seconds:>6.1f}s"
            )
        if self.decode is not None and self.decode.prefill_scheme_ppl is not None:
            lines.append(
                f"(decode tokens under the prefill scheme: PPL {self.decode.prefill_scheme_ppl:.4f})"
            )
        return "\n".join(lines)


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    width = int(spec.lstrip("+").split(".")[0]) + len(suffix)
    return f"{'-':>{width}}" if x is None else f"{format(x, spec)}{suffix}"


# ---------------------------------------------------------------------------------------------
# The full-logits prefill variant


def _find_last_valid_gather(graph: ir.Graph) -> ir.Node | None:
    """The GatherND(hidden, query_seqlens - 1) of a bound prefill graph (BindKVCachePass), if any.

    Returned as the node whose input 0 is the full hidden state and output 0 the last-token one:
    bypassing it (via the Unsqueeze after it) yields every position's logits."""
    unsqueeze = next((n for n in graph if n.name == "twophase_last_valid_hidden"), None)
    if unsqueeze is None:
        return None
    gather = unsqueeze.inputs[0].producer() if unsqueeze.inputs[0] is not None else None
    if gather is None or gather.op_type != "GatherND":
        raise ArtifactError("the bound prefill graph's last-token gather is not GatherND; recompile the artifact")
    # Rewire: Unsqueeze(GatherND(h, i)) -> h, by making the Unsqueeze the node to bypass with input h.
    unsqueeze.replace_input_with(0, gather.inputs[0])
    graph.remove(gather, safe=True)
    return unsqueeze


def full_logits_model(prefill_path: str | Path) -> ir.Model:
    """The prefill graph at `prefill_path` with its last-position Slice bypassed: logits [B, S, V].

    Weights stay external (read from the artifact's weights file when a session loads).
    """
    model = ir.load(str(prefill_path))
    graph = model.graph
    node = _find_last_valid_gather(graph) or find_last_position_slice(graph)
    if node is None:
        raise ArtifactError(
            "the prefill graph has no last-position Slice (starts=[-1], axes=[-2]) behind 'logits', so it cannot "
            "be turned into a full-window graph for perplexity; was it compiled by SplitPhasesPass?"
        )
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None
    was_output = y.is_graph_output()
    downstream = _downstream(y)
    y.replace_all_uses_with(x, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if was_output:
        x.name = "logits"
    for v in downstream:  # their sequence dim was 1; let ORT infer it again
        if not v.is_graph_output():
            v.shape = None
    ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
    seq = ids.shape[1] if ids is not None and ids.shape is not None else ir.SymbolicDim("seq")
    logits = next(v for v in graph.outputs if v.name == "logits")
    if logits.shape is not None and len(logits.shape) == 3:
        logits.shape = ir.Shape([logits.shape[0], seq, logits.shape[2]])
    log.debug("full-logits prefill variant: bypassed Slice %r", node.name)
    return model


def _downstream(value: ir.Value) -> list[ir.Value]:
    out, stack, seen = [], [value], set()
    while stack:
        v = stack.pop()
        for node, _ in v.uses():
            for o in node.outputs:
                if id(o) not in seen:
                    seen.add(id(o))
                    out.append(o)
                    stack.append(o)
    return out


def model_session(model: ir.Model, weights_dir: str | Path, threads: int | None) -> ort.InferenceSession:
    """An ORT session (the runtime's options) of an in-memory model whose external data is in `weights_dir`."""
    so = session_options(threads, GraphOptLevel.ENABLE_ALL)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclasses.dataclass
class _Scores:
    """Per predicted position: NLL of the true next token and the argmax, (W, L-1) each."""

    nll: np.ndarray
    argmax: np.ndarray


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32, copy=True)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return x


def _score(logprobs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(NLL float64 [...], argmax int32 [...]) of log-probs [..., V] against targets [...]."""
    nll = -np.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0].astype(np.float64)
    return nll, logprobs.argmax(axis=-1).astype(np.int32)


def _kl(ref_lp: np.ndarray, lp: np.ndarray) -> np.ndarray:
    """KL(ref || art) per position (float64 [...]) from log-probs [..., V]."""
    return np.sum(np.exp(ref_lp) * (ref_lp - lp), axis=-1, dtype=np.float64)


def _prefill_feeds(sess: ort.InferenceSession, window_1L: np.ndarray) -> dict[str, np.ndarray]:
    """One whole window from an empty cache, for either binding's prefill signature."""
    L = window_1L.shape[1]
    names = {i.name: i for i in sess.get_inputs()}
    if "query_seqlens" not in names:
        return {
            "input_ids": window_1L,
            "attention_mask": np.ones_like(window_1L),
            "position_ids": np.arange(L, dtype=np.int64)[None],
        }
    feeds = {
        "input_ids": window_1L,
        "seqlens_k": np.array([L - 1], dtype=np.int32),
        "total_sequence_length": np.array(L, dtype=np.int32),
        "query_seqlens": np.array([L], dtype=np.int32),
    }
    for name, arg in names.items():
        if name.startswith(PAST_PREFIX):
            _, heads, _, head_dim = arg.shape
            dtype = np.int8 if arg.type == "tensor(int8)" else np.float32
            feeds[name] = np.zeros((1, heads, L, head_dim), dtype=dtype)  # the bound buffers, empty
    return feeds


def _run_prefill(sess: ort.InferenceSession, windows_WL: np.ndarray) -> Iterator[np.ndarray]:
    """Log-probs [L, V] of each window in turn (a generator keeps one window's logits in memory)."""
    for w in windows_WL:
        (logits,) = sess.run(["logits"], _prefill_feeds(sess, w[None]))  # (1, L, V)
        yield _log_softmax(logits[0, :-1])  # (L-1, V): the predicting positions


# Rows up to which the TVM backend's int8-activation GEMV runs (accuracy level 4) in the decode library and in
# the prefill library; above them the matmuls take the float GEMM (kernels/tir/qgemv_a8.py)
TVM_GEMV_ROWS = gemv_rows_for("decode")
TVM_PREFILL_GEMV_ROWS = gemv_rows_for("prefill")


def _run_prefill_steps(
    phase: Any, manifest: Manifest, windows_WL: np.ndarray, group: int = 6
) -> Iterator[np.ndarray]:
    """_run_prefill for a TVM artifact: its prefill library returns each step's last logits only, so the
    windows run through it teacher-forced, one token per step over the bound cache, `group` windows as one
    batch: more rows than TVM_PREFILL_GEMV_ROWS, so the matmuls take the GEMM path a whole prompt takes (the
    same per-row arithmetic as the window at once). Memory: group x L x vocab float32 logits."""
    W, L = windows_WL.shape
    V = manifest.model.vocab_size
    cache = BoundKVCache.for_model(manifest.model, max_context(manifest), manifest.kv_cache["dtype"])
    for start in range(0, W, group):
        rows = windows_WL[start : start + group]
        real = rows.shape[0]
        if real <= TVM_PREFILL_GEMV_ROWS:  # a short last group: pad with copies so it too takes the GEMM path
            rows = np.concatenate([rows, np.repeat(rows[:1], TVM_PREFILL_GEMV_ROWS + 1 - real, axis=0)])
        B = rows.shape[0]
        ones = np.ones(B, dtype=np.int64)
        cache.allocate(B, L)
        step = phase.decode_step(cache, V)
        logits = np.empty((B, L - 1, V), np.float32)
        for t in range(L - 1):
            logits[:, t] = step.run(rows[:, t], cache.lengths + 1, ones)
            cache.advance(ones)
        for b in range(real):
            yield _log_softmax(logits[b])


def _prefill_iter(root: Path, manifest: Manifest, windows_WL: np.ndarray, threads: int | None):
    """Log-probs of each window under the artifact's prefill scheme, for either backend."""
    entry = manifest.phases["prefill"]
    if entry.backend == "tvm":
        from twophase.runtime.backend_tvm import TvmPhase

        return _run_prefill_steps(TvmPhase(root, entry, name="prefill", threads=threads), manifest, windows_WL)
    return _run_prefill(model_session(full_logits_model(resolve(root, entry.graph)), root, threads), windows_WL)


def _decode_scores(
    phase: OrtPhase, manifest: Manifest, windows_BL: np.ndarray, ref_lp: np.ndarray | None
) -> tuple[_Scores, np.ndarray | None]:
    """Teacher-forced decode from an empty cache over a batch of windows; (scores, KL [B, L-1] or None)."""
    facts = manifest.model
    B, L = windows_BL.shape
    if manifest.kv_cache["binding"] == "bound":
        return _decode_scores_bound(phase, manifest, windows_BL, ref_lp)
    dtype = np.dtype(manifest.kv_cache["dtype"])
    past_names = facts.kv_names(PAST_PREFIX)
    present_names = facts.kv_names(PRESENT_PREFIX)
    past = [np.zeros((B, facts.num_kv_heads, 0, facts.head_dim), dtype) for _ in past_names]  # (B, H, 0, D)
    nll = np.empty((B, L - 1))
    argmax = np.empty((B, L - 1), dtype=np.int32)
    kl = None if ref_lp is None else np.empty((B, L - 1))
    outputs = ["logits", *present_names]
    for t in range(L - 1):
        feeds = dict(zip(past_names, past))
        feeds["input_ids"] = np.ascontiguousarray(windows_BL[:, t : t + 1])  # (B, 1)
        feeds["attention_mask"] = np.ones((B, t + 1), dtype=np.int64)
        feeds["position_ids"] = np.full((B, 1), t, dtype=np.int64)
        logits, *past = phase.session.run(outputs, feeds)
        lp = _log_softmax(logits[:, -1])  # (B, V)
        nll[:, t], argmax[:, t] = _score(lp, windows_BL[:, t + 1])
        if kl is not None:
            kl[:, t] = _kl(ref_lp[:, t], lp)
    return _Scores(nll, argmax), kl


def _decode_scores_bound(
    phase: OrtPhase, manifest: Manifest, windows_BL: np.ndarray, ref_lp: np.ndarray | None, rows: int | None = None
) -> tuple[_Scores, np.ndarray | None]:
    """_decode_scores for a bound-KV decode graph: the runtime's own cache and decode step, `rows` windows
    per batch (None: all at once)."""
    B, L = windows_BL.shape
    nll = np.empty((B, L - 1))
    argmax = np.empty((B, L - 1), dtype=np.int32)
    kl = None if ref_lp is None else np.empty((B, L - 1))
    cache = BoundKVCache.for_model(manifest.model, max_context(manifest), manifest.kv_cache["dtype"])
    rows = rows or B
    for r0 in range(0, B, rows):
        part = slice(r0, min(B, r0 + rows))
        wins = windows_BL[part]
        ones = np.ones(wins.shape[0], dtype=np.int64)
        cache.allocate(wins.shape[0], L)
        step = phase.decode_step(cache, manifest.model.vocab_size)
        for t in range(L - 1):
            lp = _log_softmax(step.run(wins[:, t], cache.lengths + 1, ones))  # (rows, V)
            cache.advance(ones)
            nll[part, t], argmax[part, t] = _score(lp, wins[:, t + 1])
            if kl is not None:
                kl[part, t] = _kl(ref_lp[part, t], lp)
    return _Scores(nll, argmax), kl


def _ppl(nll: np.ndarray) -> float:
    return float(np.exp(np.mean(nll)))


# ---------------------------------------------------------------------------------------------
# The evaluation


def _artifact_ids(root: Path, manifest: Manifest) -> np.ndarray:
    paths = tokenizer_paths(root, manifest)
    if paths is None:
        raise ArtifactError(f"{root} ships no tokenizer: pass the token ids to evaluate (ids=...)")
    return corpus.corpus_ids(paths[0])


def _check_reference(manifest: Manifest, ref: Manifest, ref_dir: Path) -> None:
    if ref.model.vocab_size != manifest.model.vocab_size:
        raise ArtifactError(
            f"reference {ref_dir} has vocab {ref.model.vocab_size}, the artifact {manifest.model.vocab_size}: "
            "compare artifacts of the same model"
        )
    if ref.tokenizer and manifest.tokenizer:
        a, b = manifest.files.get(manifest.tokenizer["file"]), ref.files.get(ref.tokenizer["file"])
        if a != b:
            log.warning("reference %s has a different tokenizer.json than the artifact", ref_dir)
    if ref.phases["prefill"].scheme != "fp32":
        log.warning("reference %s prefill scheme is %s, not fp32", ref_dir, ref.phases["prefill"].scheme)


def evaluate_artifact(
    artifact_dir: str | Path,
    reference_dir: str | Path | None = None,
    *,
    windows: int = corpus.DEFAULT_EVAL_WINDOWS,
    length: int = corpus.DEFAULT_EVAL_LENGTH,
    decode_windows: int | None = None,
    decode_length: int | None = None,
    threads: int | None = 2,
    ids: np.ndarray | None = None,
) -> EvalReport:
    """Perplexity of each phase's scheme (and agreement / dPPL / KL vs `reference_dir`); see module doc.

    `ids` replaces the default corpus (token ids of the artifact's tokenizer). The decode phase runs
    `decode_windows` (default min(8, windows)) x `decode_length` (default min(256, length)) tokens;
    `decode_windows=0` skips it.
    """
    if decode_windows is None:
        decode_windows = min(DEFAULT_DECODE_WINDOWS, windows)
    if decode_length is None:
        decode_length = min(DEFAULT_DECODE_LENGTH, length)
    root = Path(artifact_dir)
    manifest = load_manifest(root)
    ref_root = Path(reference_dir) if reference_dir is not None else None
    ref_manifest = load_manifest(ref_root) if ref_root is not None else None
    if ref_manifest is not None:
        _check_reference(manifest, ref_manifest, ref_root)

    limit = min(max_context(manifest), max_context(ref_manifest) if ref_manifest else max_context(manifest))
    if length > limit:
        raise ContextLengthError(f"windows of {length} tokens exceed the artifact's maximum context of {limit}")
    if decode_windows < 0 or decode_windows > windows or decode_length > length:
        raise TwophaseError(
            f"decode windows ({decode_windows} x {decode_length}) must be a subset of the evaluation windows "
            f"({windows} x {length})"
        )
    if decode_windows and decode_length < 2:
        raise TwophaseError(f"decode_length must be at least 2, got {decode_length}")

    if ids is None:
        ids = _artifact_ids(root, manifest)
        corpus_info = {"name": corpus.CORPUS_NAME, "sha256": corpus.corpus_sha256(), "tokens": int(ids.size)}
    else:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        corpus_info = {"name": "custom", "sha256": hashlib.sha256(ids.tobytes()).hexdigest(), "tokens": int(ids.size)}
    if ids.max(initial=0) >= manifest.model.vocab_size or ids.min(initial=0) < 0:
        raise TwophaseError(f"token ids fall outside the model's vocabulary [0, {manifest.model.vocab_size})")
    wins = corpus.eval_windows(ids, windows, length)  # (W, L)
    dec_idx = np.linspace(0, windows - 1, decode_windows).astype(int) if decode_windows else np.zeros(0, int)
    Ld = decode_length

    # -- prefill scheme ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    W, L = wins.shape
    has_ref = ref_manifest is not None
    art = _Scores(np.empty((W, L - 1)), np.empty((W, L - 1), np.int32))
    ref = _Scores(np.empty((W, L - 1)), np.empty((W, L - 1), np.int32)) if has_ref else None
    kl = np.empty((W, L - 1)) if has_ref else None
    ref_dec_lp = (
        np.empty((len(dec_idx), Ld - 1, manifest.model.vocab_size), np.float32) if has_ref and len(dec_idx) else None
    )
    ref_iter = _prefill_iter(ref_root, ref_manifest, wins, threads) if has_ref else None
    for i, lp in enumerate(_prefill_iter(root, manifest, wins, threads)):
        art.nll[i], art.argmax[i] = _score(lp, wins[i, 1:])
        if ref_iter is not None:
            ref_lp = next(ref_iter)
            ref.nll[i], ref.argmax[i] = _score(ref_lp, wins[i, 1:])
            kl[i] = _kl(ref_lp, lp)
            if ref_dec_lp is not None and i in dec_idx:
                for j in np.flatnonzero(dec_idx == i):
                    ref_dec_lp[j] = ref_lp[: Ld - 1]
        log.debug("prefill window %d/%d", i + 1, W)
    prefill = PhaseEval(
        "prefill",
        manifest.phases["prefill"].scheme,
        W,
        L,
        int(art.nll.size),
        _ppl(art.nll),
        round(time.perf_counter() - t0, 2),
    )
    if ref is not None:
        _compare(prefill, art, ref, kl)
    del ref_iter
    log.info("prefill scheme: PPL %.4f over %d x %d tokens in %.1f s", prefill.ppl, W, L, prefill.seconds)

    # -- decode scheme ----------------------------------------------------------------------------
    decode = None
    if len(dec_idx):
        t0 = time.perf_counter()
        entry = manifest.phases["decode"]
        if entry.backend == "tvm":
            from twophase.runtime.backend_tvm import TvmPhase

            phase = TvmPhase(root, entry, name="decode", threads=threads)
        else:
            phase = OrtPhase(resolve(root, entry.graph), entry, name="decode", threads=threads)
        dec_wins = np.ascontiguousarray(wins[dec_idx, :Ld])  # (Bd, Ld)
        if entry.backend == "tvm":  # decode as deployed: at most GEMV_ROWS rows (the int8-activation GEMV)
            scores, dkl = _decode_scores_bound(phase, manifest, dec_wins, ref_dec_lp, rows=TVM_GEMV_ROWS)
        else:
            scores, dkl = _decode_scores(phase, manifest, dec_wins, ref_dec_lp)
        decode = PhaseEval(
            "decode",
            entry.scheme,
            len(dec_idx),
            Ld,
            int(scores.nll.size),
            _ppl(scores.nll),
            round(time.perf_counter() - t0, 2),
            prefill_scheme_ppl=_ppl(art.nll[dec_idx, : Ld - 1]),
        )
        if ref is not None:
            sub = _Scores(ref.nll[dec_idx, : Ld - 1], ref.argmax[dec_idx, : Ld - 1])
            _compare(decode, scores, sub, dkl)
        log.info("decode scheme: PPL %.4f over %d x %d tokens in %.1f s", decode.ppl, len(dec_idx), Ld, decode.seconds)

    kv = {k: manifest.kv_cache.get(k) for k in ("binding", "dtype")}
    return EvalReport(str(root), str(ref_root) if ref_root else None, corpus_info, threads or 0, prefill, decode, kv)


def _compare(p: PhaseEval, art: _Scores, ref: _Scores, kl: np.ndarray | None) -> None:
    p.reference_ppl = _ppl(ref.nll)
    p.dppl_pct = 100.0 * (p.ppl / p.reference_ppl - 1.0)
    p.agreement = float(np.mean(art.argmax == ref.argmax))
    p.mean_kl = float(np.mean(kl)) if kl is not None else None
