"""W8A8 prefill probe: tok/s (128/512-token prompts) and perplexity of W8A8 variants vs fp32, one run.

    python benchmarks/w8a8_probe.py [--artifact out/smollm2-135m-instruct] [--threads 2] [--reps 7]
                                    [--variants fp32,dyn,dyn-sq0.5,static-sq0.5] [--ppl-windows 20]
                                    [--calib-windows 8] [--no-speed] [--no-ppl]

Variants are built from the artifact's fp32 prefill.onnx with QuantizeActivationsPass (+ SmoothQuant)
and FuseInt8MatMulPass; the lm_head (a graph-output MatMul, run on one position in prefill) stays
float. Speed: each repetition runs every variant once per prompt length, interleaved, ORT
ORT_ENABLE_ALL, `--threads` intra-op threads; medians reported, ratio to fp32 of the same run.
PPL: the prefill graph with its last-position Slice removed (logits for all positions), on CPython's
pydoc_data/topics.py tokenized with the artifact's tokenizer, `--ppl-windows` evenly spaced windows
of 512 tokens (DESIGN.md); calibration (static scales, SmoothQuant) uses `--calib-windows` windows
starting midway between evaluation windows, so calibration and evaluation text differ.

Calibration statistics are collected here (per-input-channel absmax of each MatMul's activation
input, by running the fp32 graph with those values as extra outputs) until
twophase/compiler/calibration.py provides them.

Variant names: fp32 | dyn | dyn8 (8-bit weights, VNNI/AMX machines only) | dyn-sqA | static-sqA |
static, where A is the SmoothQuant alpha (e.g. dyn-sq0.5); `-keepdown` keeps down_proj-like MatMuls
(K > hidden size) in float.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from twophase.compiler.options import ActivationMode
from twophase.passes.fuse_int8_matmul import FuseInt8MatMulPass
from twophase.passes.quantize_activations import (
    QuantizeActivationsPass,
    produces_graph_output,
    weight_of,
)

log = logging.getLogger("w8a8_probe")
WINDOW = 512


def corpus_tokens(tokenizer_path: Path) -> np.ndarray:
    from pydoc_data import topics

    from tokenizers import Tokenizer

    text = Path(topics.__file__).read_text(encoding="utf-8")
    return np.asarray(Tokenizer.from_file(str(tokenizer_path)).encode(text).ids, np.int64)


def eval_starts(n: int, windows: int) -> np.ndarray:
    return np.linspace(0, n - WINDOW, windows).astype(int)


def calib_starts(n: int, windows: int) -> np.ndarray:
    """Starts midway between the 20 evaluation windows' starts (first `windows` of them)."""
    ev = eval_starts(n, 20)
    mid = ((ev[:-1] + ev[1:]) // 2)
    return mid[np.linspace(0, len(mid) - 1, windows).astype(int)]


def all_positions(model: ir.Model) -> ir.Model:
    """A copy of a prefill graph with the last-position Slice before the lm_head removed."""
    model = model.clone()
    for node in model.graph:
        if node.op_type == "Slice" and node.outputs[0].name == "twophase_last_hidden":
            out = node.outputs[0]
            out.replace_all_uses_with(node.inputs[0])
            model.graph.remove(node, safe=True)
            for o in model.graph.outputs:
                if o.name == "logits":
                    o.shape = None
            return model
    raise SystemExit("no last-position Slice (twophase_last_hidden) in the prefill graph")


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feeds(ids: np.ndarray) -> dict[str, np.ndarray]:
    x = ids.reshape(1, -1).astype(np.int64)
    return {"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": np.arange(x.shape[1], dtype=np.int64)[None]}


def collect_absmax(full: ir.Model, tokens: np.ndarray, starts: np.ndarray, threads: int, tmp: Path) -> dict[str, np.ndarray]:
    """Per-input-channel absmax of every constant-weight MatMul's activation input."""
    model = full.clone()
    names = sorted({n.inputs[0].name for n in model.graph if weight_of(n) is not None})
    values = {v.name: v for n in model.graph for v in n.inputs if v is not None and v.name in names}
    for name in names:
        model.graph.outputs.append(values[name])
    path = tmp / "calib.onnx"
    ir.save(model, path, external_data="calib.bin")
    sess = session(path, threads)
    stats: dict[str, np.ndarray] = {}
    for s in starts:
        outs = sess.run(names, feeds(tokens[s : s + WINDOW]))
        for name, arr in zip(names, outs):
            m = np.abs(arr.reshape(-1, arr.shape[-1])).max(axis=0)
            stats[name] = m if name not in stats else np.maximum(stats[name], m)
    log.info("calibration: %d activations over %d windows", len(stats), len(starts))
    return stats


def build_variant(name: str, base: ir.Model, stats: dict[str, np.ndarray]) -> ir.Model:
    if name == "fp32":
        return base.clone()
    parts = name.split("-")
    mode = ActivationMode.STATIC if parts[0] == "static" else ActivationMode.DYNAMIC
    bits = 8 if parts[0] == "dyn8" else 7
    alpha = next((float(p[2:]) for p in parts if p.startswith("sq")), None)
    hidden = min(weight_of(n).shape[0] for n in base.graph if weight_of(n) is not None)
    keepdown = "keepdown" in parts
    # keepdownN: keep float the N down_proj-like MatMuls whose input has the largest calibrated absmax
    top = next((int(p[8:]) for p in parts if p.startswith("keepdown") and p[8:].isdigit()), 0)
    downs = [n for n in base.graph if weight_of(n) is not None and weight_of(n).shape[0] > hidden]
    ranked = sorted(downs, key=lambda n: -float(np.max(stats.get(n.inputs[0].name, 0.0))))
    kept = {n.name for n in ranked[:top]}
    if kept:
        log.info("%s keeps float: %s", name, sorted(kept))

    def skip(node: ir.Node) -> bool:
        down = weight_of(node).shape[0] > hidden
        return produces_graph_output(node) or (down and (keepdown or node.name in kept))

    model = base.clone()
    QuantizeActivationsPass(mode, stats, alpha, skip=skip, weight_bits=bits)(model)
    FuseInt8MatMulPass(allow_8bit_weights=bits == 8)(model)
    return model


def perplexity(sess: ort.InferenceSession, tokens: np.ndarray, starts: np.ndarray) -> float:
    nll = []
    for s in starts:
        ids = tokens[s : s + WINDOW]
        logits = sess.run(["logits"], feeds(ids))[0][0].astype(np.float64)  # (S, V)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll.append(-logp[np.arange(WINDOW - 1), ids[1:]])
    return float(np.exp(np.concatenate(nll).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=Path("out/smollm2-135m-instruct"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--variants", default="fp32,dyn,dyn-sq0.5,static-sq0.5")
    ap.add_argument("--ppl-windows", type=int, default=20)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--save", type=Path, help="keep the variant graphs in this directory")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    base = ir.load(args.artifact / "prefill.onnx")
    tokens = corpus_tokens(args.artifact / "tokenizer.json")
    names = args.variants.split(",")
    with tempfile.TemporaryDirectory() as td:
        tmp = args.save or Path(td)
        tmp.mkdir(parents=True, exist_ok=True)
        full = all_positions(base)
        needs_stats = any("sq" in n or "keepdown" in n or n.startswith("static") for n in names)
        stats = collect_absmax(full, tokens, calib_starts(len(tokens), args.calib_windows), args.threads, tmp) if needs_stats else {}
        paths: dict[str, tuple[Path, Path]] = {}
        for name in names:
            t = time.perf_counter()
            model = build_variant(name, base, stats)
            p_last, p_full = tmp / f"{name}.onnx", tmp / f"{name}-full.onnx"
            ir.save(model, p_last, external_data=f"{name}.bin")
            ir.save(all_positions(model), p_full, external_data=f"{name}-full.bin")
            paths[name] = (p_last, p_full)
            log.info("built %s in %.1fs", name, time.perf_counter() - t)

        speed: dict[str, dict[int, float]] = {n: {} for n in names}
        if not args.no_speed:
            sessions = {n: session(paths[n][0], args.threads) for n in names}
            prompts = {L: feeds(tokens[1000 : 1000 + L]) for L in (128, 512)}
            for n in names:  # warm-up
                for f in prompts.values():
                    sessions[n].run(["logits"], f)
            times: dict[tuple[str, int], list[float]] = {(n, L): [] for n in names for L in prompts}
            for _ in range(args.reps):
                for L, f in prompts.items():
                    for n in names:
                        t = time.perf_counter()
                        sessions[n].run(["logits"], f)
                        times[n, L].append(time.perf_counter() - t)
            for (n, L), ts in times.items():
                speed[n][L] = L / statistics.median(ts)
            del sessions
        ppl: dict[str, float] = {}
        if not args.no_ppl:
            starts = eval_starts(len(tokens), 20)[: args.ppl_windows] if args.ppl_windows < 20 else eval_starts(len(tokens), 20)
            for n in names:
                ppl[n] = perplexity(session(paths[n][1], args.threads), tokens, starts)
                log.info("ppl %s = %.4f", n, ppl[n])

    ref = names[0]
    print(f"{'variant':22s} {'tok/s@128':>10s} {'x':>6s} {'tok/s@512':>10s} {'x':>6s} {'PPL':>9s} {'dPPL':>7s}")
    for n in names:
        row = f"{n:22s}"
        for L in (128, 512):
            v = speed[n].get(L)
            row += f" {v:10.1f} {v / speed[ref][L]:6.2f}" if v else f" {'-':>10s} {'-':>6s}"
        if n in ppl:
            row += f" {ppl[n]:9.4f} {100 * (ppl[n] / ppl[ref] - 1):+6.2f}%"
        print(row)


if __name__ == "__main__":
    main()
