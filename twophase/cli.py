"""The `twophase` command: compile, run, eval, serve, serve-config, export, diff, inspect.

The CLI owns all output (the library logs, never prints) and parses options once into the
compiler's enums and dataclasses.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from twophase.compiler.errors import TwophaseError


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twophase",
        description="Compile a decoder-only LLM into separate prefill and decode executables, and run them.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile a model into an artifact directory")
    p.add_argument("source", help="zoo name (e.g. smollm2-135m-instruct), HF model dir, .gguf or .onnx file")
    p.add_argument("-o", "--output", required=True, type=Path, help="artifact directory to create")
    p.add_argument("--prefill", default=None, help="prefill scheme: fp32, w8a16, w4a16, w8a8[-dynamic|-static]")
    p.add_argument("--decode", default=None, help="decode scheme: fp32, w8a16, w4a16, w8a8[-dynamic|-static]")
    q = p.add_argument_group("quantization (applies to every phase whose scheme uses it)")
    q.add_argument("--algorithm", default=None, help="weight codes: rtn, gptq (calibrated), gguf (keep a GGUF source's grid)")
    q.add_argument("--block-size", type=int, default=32, help="int4 block along the reduction axis (16..256)")
    q.add_argument("--asym", action="store_true", help="int4 with zero points (uint4) instead of symmetric int4")
    q.add_argument("--activations", default=None, help="w8a8 activation scales: dynamic (per token) or static")
    q.add_argument("--smoothquant", default=None, metavar="ALPHA|off",
                   help="w8a8 SmoothQuant alpha in [0, 1] (default: 0.4 dynamic, 0.8 static), or off")
    q.add_argument("--accuracy-level", type=int, default=4,
                   help="weight-only kernels' accuracy level: 4 (default) int8 activations per block (ORT MatMulNBits; "
                        "TVM's decode GEMV), 1 float activations (exact dequantization)")
    q.add_argument("--calibration-windows", type=int, default=16, help="512-token calibration windows")
    p.add_argument("--backend", default="ort",
                   help="ort (ONNX Runtime graphs) or tvm (TVM executables with twophase's kernels; needs "
                        "twophase[tvm]; schemes fp32/w8a16/w4a16, default w4a16 for both phases)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max-len", type=int, default=None, help="longest prompt+generation accepted (default: the model's)")
    k = p.add_argument_group("KV cache")
    k.add_argument("--kv-cache", default="auto",
                   help="bound (preallocated buffers updated in place), grow (past in, present out), or auto "
                        "(bound where the attention matches, default)")
    k.add_argument("--kv-dtype", default="float32", help="float32, or int8 (bound only; scales calibrated on text)")
    k.add_argument("--no-fusions", action="store_true",
                   help="skip the fusions (packed q/k/v and gate/up; ORT: SkipSimplifiedLayerNormalization; "
                        "TVM: norms, SwiGLU and residual adds inside the matmul kernels)")
    k.add_argument("--prefill-chunk", type=int, default=512, help="bound: longest prompt step in tokens (default 512)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact directory")

    p = sub.add_parser("run", help="generate text with a compiled artifact")
    p.add_argument("artifact", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ORT's choice)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (needs onnxruntime-gpu and a GPU)")
    p.add_argument("--stats", action="store_true", help="print timing statistics to stderr")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact files")
    _add_sampling_args(p)

    p = sub.add_parser("eval", help="perplexity and greedy agreement of each phase's scheme vs an fp32 artifact")
    p.add_argument("artifact", type=Path)
    p.add_argument("--reference", type=Path, default=None, help="fp32 artifact of the same model to compare with")
    p.add_argument("--windows", type=int, default=20, help="prefill: evaluation windows (evenly spaced)")
    p.add_argument("--length", type=int, default=512, help="prefill: tokens per window")
    p.add_argument("--decode-windows", type=int, default=None, help="decode: windows (teacher-forced steps)")
    p.add_argument("--decode-length", type=int, default=None, help="decode: tokens per window")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("artifact", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 503s (default 256)")
    p.add_argument("--prefill-graph-from-batch", type=int, default=None, metavar="N",
                   help="decode steps with N or more running requests use the prefill graph (faster at large batch "
                        "with a w8a8 prefill; those tokens follow the prefill scheme's numerics). Default: never")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the artifact's directory name)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ORT's choice)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (needs onnxruntime-gpu and a GPU)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact files")

    p = sub.add_parser("serve-config", help="configuration for serving an artifact with another engine (scale-out)")
    p.add_argument("artifact", type=Path)
    p.add_argument("--target", default="triton",
                   help="triton: a Triton Inference Server model repository (ONNX Runtime backend per phase, "
                        "a Python-backend model for the loop; needs a --kv-cache grow artifact)")
    p.add_argument("-o", "--output", required=True, type=Path, help="directory to write the configuration into")
    p.add_argument("--instances", type=int, default=1, help="model instances per model (default 1)")
    p.add_argument("--model-name", default=None, help="model name (default: the artifact's directory name)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")

    p = sub.add_parser("bench", help="prefill/decode throughput over batch sizes and contexts, vs fp32, with plots")
    p.add_argument("artifacts", type=Path, nargs="+", help="artifact directories (include an fp32 one per model)")
    p.add_argument("-o", "--output", type=Path, default=Path("out/bench"), help="where results.csv/.md and plots go")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--contexts", default="128,512,2048")
    p.add_argument("--phases", default="prefill,decode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--roofline", action="store_true", help="also measure bandwidth / GEMM peaks and report bounds")

    p = sub.add_parser("export", help="export a source to the canonical ONNX graph (no passes)")
    p.add_argument("source")
    p.add_argument("-o", "--output", required=True, type=Path, help="directory to write model.onnx etc. into")

    p = sub.add_parser("diff", help="structural diff of two ONNX graphs")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inspect", help="summarize an artifact: phases, ops, weight bytes")
    p.add_argument("artifact", type=Path)
    p.add_argument("--json", action="store_true")
    return parser


def _enum_value(enum_cls, value: str, flag: str):
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(e.value for e in enum_cls)
        raise TwophaseError(f"{flag} {value!r} is not one of: {choices}") from None


def _parse_compile_options(args: argparse.Namespace):
    from twophase.compiler import defaults
    from twophase.compiler.options import (
        ActivationMode,
        Backend,
        CompileOptions,
        Device,
        KVBinding,
        KVDtype,
        PhaseOptions,
        QuantScheme,
        WeightAlgorithm,
    )

    if args.max_len is not None and args.max_len < 2:
        raise TwophaseError(f"--max-len must be at least 2, got {args.max_len}")
    if args.prefill_chunk < 1:
        raise TwophaseError(f"--prefill-chunk must be at least 1, got {args.prefill_chunk}")
    if args.calibration_windows < 1:
        raise TwophaseError(f"--calibration-windows must be at least 1, got {args.calibration_windows}")

    def phase_options(spec: str | None, flag: str, default: PhaseOptions) -> PhaseOptions:
        scheme_text, _, mode = (spec or default.scheme.value).partition("-")
        scheme = _enum_value(QuantScheme, scheme_text, flag)
        if mode and scheme is not QuantScheme.W8A8:
            raise TwophaseError(f"{flag} {spec!r}: only w8a8 takes a -dynamic/-static suffix")
        activations = mode or args.activations or default.activations.value
        alpha = default.smoothquant_alpha
        if activations == "static" and alpha is not None:
            alpha = defaults.STATIC_SMOOTHQUANT_ALPHA
        if args.smoothquant is not None:
            try:
                alpha = None if args.smoothquant == "off" else float(args.smoothquant)
            except ValueError:
                raise TwophaseError(f"--smoothquant {args.smoothquant!r} is neither a number nor 'off'") from None
        try:
            return PhaseOptions(
                scheme=scheme,
                algorithm=_enum_value(WeightAlgorithm, args.algorithm or default.algorithm.value, "--algorithm"),
                block_size=args.block_size,
                symmetric=not args.asym,
                activations=_enum_value(ActivationMode, activations, "--activations"),
                smoothquant_alpha=alpha,
                accuracy_level=args.accuracy_level,
            )
        except ValueError as e:  # PhaseOptions' own range checks
            raise TwophaseError(f"{flag}: {e}") from None

    prefill_default, decode_default = defaults.phase_defaults(args.source)
    backend = _enum_value(Backend, args.backend, "--backend")
    if backend is Backend.TVM:
        prefill_default = decode_default  # both phases read one weight copy (w8a8 prefill: --prefill w8a8)
    return CompileOptions(
        backend=backend,
        device=_enum_value(Device, args.device, "--device"),
        prefill=phase_options(args.prefill, "--prefill", prefill_default),
        decode=phase_options(args.decode, "--decode", decode_default),
        max_len=args.max_len,
        kv_binding=_enum_value(KVBinding, args.kv_cache, "--kv-cache"),
        kv_dtype=_enum_value(KVDtype, args.kv_dtype, "--kv-dtype"),
        prefill_chunk=args.prefill_chunk,
        fusions=not args.no_fusions,
        calibration_windows=args.calibration_windows,
    )


def cmd_compile(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from twophase.compiler.driver import compile_model

    options = _parse_compile_options(args)
    steps = ["load / export canonical graph", "prefill pipeline", "decode pipeline", "write graphs and weights"]
    with tqdm(total=len(steps), desc="compile", unit="step", file=sys.stderr) as bar:
        seen = []

        def progress(name: str) -> None:
            if seen:
                bar.update(1)
            seen.append(name)
            bar.set_postfix_str(name)

        out = compile_model(args.source, args.output, options, overwrite=args.force, progress=progress)
        bar.update(1)
    print(f"wrote {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from twophase.runtime.engine import Engine

    engine = Engine.load(args.artifact, threads=args.threads, device=args.device, verify=not args.no_verify)
    pieces = engine.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        seed=args.seed,
        chat=args.chat,
        stream=True,
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        s = engine.stats
        print(
            f"prompt {s.prompt_tokens} tok, generated {s.generated_tokens} tok | ttft {s.ttft_s * 1e3:.0f} ms | "
            f"prefill {s.prefill_tok_s:.1f} tok/s | decode {s.decode_tok_s:.1f} tok/s",
            file=sys.stderr,
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from twophase.runtime.engine import Engine

    try:
        from twophase.serve.app import create_app
        from twophase.serve.scheduler import Scheduler
        from twophase.serve.server import listen, run
    except ImportError as e:
        raise TwophaseError(f"serving needs the 'serve' extra ({e.name} is not installed): "
                            "pip install 'twophase[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise TwophaseError(f"--port must be in [0, 65535], got {args.port}")
    engine = Engine.load(args.artifact, threads=args.threads, device=args.device, verify=not args.no_verify)
    if args.prefill_graph_from_batch is not None:
        if args.prefill_graph_from_batch < 1:
            raise TwophaseError(f"--prefill-graph-from-batch must be >= 1, got {args.prefill_graph_from_batch}")
        engine.prefill_graph_from_rows = args.prefill_graph_from_batch
    scheduler = Scheduler(engine, max_batch=args.max_batch, max_queue=args.max_queue)
    name = args.model_name or args.artifact.resolve().name
    app = create_app(scheduler, name)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    binding = "bound KV cache" if engine.bound else "grow KV cache: one request at a time"
    print(f"serving {name!r} ({binding}, max batch {scheduler.max_batch}, context {engine.max_len}) "
          f"at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    level = {0: "warning", 1: "info"}.get(args.verbose, "debug")
    run(app, sock, log_level=level)
    return 0


def cmd_serve_config(args: argparse.Namespace) -> int:
    from twophase.serve.scaleout import ScaleOutTarget, write_serve_config

    target = _enum_value(ScaleOutTarget, args.target, "--target")
    out = write_serve_config(args.artifact, args.output, target, model_name=args.model_name,
                             instances=args.instances, overwrite=args.force)
    for path in out:
        print(f"wrote {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from twophase.compiler.evaluate import evaluate_artifact

    kwargs = {"windows": args.windows, "length": args.length, "threads": args.threads}
    if args.decode_windows is not None:
        kwargs["decode_windows"] = args.decode_windows
    if args.decode_length is not None:
        kwargs["decode_length"] = args.decode_length
    report = evaluate_artifact(args.artifact, args.reference, **kwargs)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from twophase.bench.report import write_report
    from twophase.bench.runner import BenchConfig, run_bench

    def ints(text: str, flag: str) -> tuple[int, ...]:
        try:
            return tuple(int(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise TwophaseError(f"{flag} {text!r} is not a comma-separated list of integers") from None

    config = BenchConfig(
        batches=ints(args.batches, "--batches"),
        contexts=ints(args.contexts, "--contexts"),
        threads=args.threads,
        reps=args.reps,
        decode_steps=args.decode_steps,
        phases=tuple(p for p in args.phases.split(",") if p),
        roofline=args.roofline,
    )
    result = run_bench(args.artifacts, config, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    paths = write_report(result, args.output)
    print((args.output / "results.md").read_text())
    print(f"wrote {paths['csv']}, {paths['markdown']} and {len(paths['plots'])} plots in {args.output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import shutil

    from twophase.models.sources import SourceKind, load_canonical, resolve_source

    source = resolve_source(args.source)
    if source.kind is SourceKind.ONNX:
        raise TwophaseError(f"{args.source} is already ONNX; compile it directly")
    canonical = load_canonical(source)
    args.output.mkdir(parents=True, exist_ok=True)
    export_dir = canonical.export_dir
    for f in export_dir.iterdir():
        shutil.copyfile(f, args.output / f.name)
    print(f"wrote {args.output / 'model.onnx'}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from twophase.compiler.graph_diff import diff_models

    for p in (args.a, args.b):
        if not p.is_file():
            raise TwophaseError(f"{p}: no such file")
    d = diff_models(args.a, args.b)
    print(json.dumps(d.to_dict(), indent=2) if args.json else d.format())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from twophase.compiler.inspect import inspect_artifact

    info = inspect_artifact(args.artifact)
    print(json.dumps(info, indent=2) if args.json else info["text"])
    return 0


COMMANDS = {
    "compile": cmd_compile,
    "run": cmd_run,
    "eval": cmd_eval,
    "bench": cmd_bench,
    "serve": cmd_serve,
    "serve-config": cmd_serve_config,
    "export": cmd_export,
    "diff": cmd_diff,
    "inspect": cmd_inspect,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except TwophaseError as e:
        print(f"twophase {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
