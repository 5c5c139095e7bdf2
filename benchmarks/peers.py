"""twophase against its peers on the default model, same token ids, same threads, one run (issue: peers table).

    python benchmarks/peers.py [--artifact out/smollm2-135m-instruct] [--threads 2] [--reps 5]

Runs benchmarks/phases.py with every peer that is installed (recipes in benchmarks/PEERS.md, all outside
the repo under $TWOPHASE_PEERS_DIR, default /work/peers): onnxruntime-genai's int4 and fp32 builds of
SmolLM2-135M-Instruct, llama.cpp (llama-cpp-python) on the same Q4_1 GGUF twophase compiles, and
transformers eager fp32. twophase's artifact is the default compile (w8a8 prefill, w4a16 GGUF-grid decode):
the best scheme per phase. OMP_WAIT_POLICY=PASSIVE is set for every peer process.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import phases  # noqa: E402
from peers_genai import default_models, peers_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, action="append", default=None)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

    argv = ["--model", args.model, "--threads", str(args.threads), "--reps", str(args.reps)]
    for a in args.artifact or [Path("out") / args.model]:
        argv += ["--artifact", str(a)]
    missing = []
    for label, model_dir in default_models().items():
        if (model_dir / "genai_config.json").is_file():
            argv += ["--genai", f"{label}={model_dir}"]
        else:
            missing.append(f"onnxruntime-genai {label} ({model_dir})")
    if (peers_dir() / "llamacpp-venv" / "bin" / "python").is_file():
        from twophase.models import zoo

        argv += ["--llamacpp", str(zoo.fetch(args.model))]
    else:
        missing.append(f"llama.cpp ({peers_dir() / 'llamacpp-venv'})")
    if missing:
        print("not installed, skipped (see benchmarks/PEERS.md): " + "; ".join(missing), file=sys.stderr)
    return phases.main(argv)


if __name__ == "__main__":
    sys.exit(main())
