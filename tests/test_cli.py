"""The `twophase` command on a tiny model: every subcommand, and its errors (exit 2, a named cause)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def twophase(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twophase.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_hf_dir):
    hf, _ = tiny_hf_dir("gqa")
    out = tmp_path_factory.mktemp("cli") / "art"
    proc = twophase("compile", str(hf), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    return out


def test_run_streams_text_and_stats(compiled):
    proc = twophase("run", str(compiled), "--prompt", "hello", "--max-new-tokens", "8", "--stats", "--seed", "1",
                    "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "prefill" in proc.stderr and "decode" in proc.stderr
    again = twophase("run", str(compiled), "--prompt", "hello", "--max-new-tokens", "8", "--seed", "1",
                     "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.1")
    assert again.stdout == proc.stdout  # seeded sampling is reproducible


def test_run_chat(compiled):
    proc = twophase("run", str(compiled), "--chat", "--prompt", "hi", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr


def test_inspect_and_diff(compiled):
    proc = twophase("inspect", str(compiled))
    assert proc.returncode == 0, proc.stderr
    assert "[prefill]" in proc.stdout and "[decode]" in proc.stdout and "uint8" in proc.stdout
    info = json.loads(twophase("inspect", str(compiled), "--json").stdout)
    # the default schemes: w8a8 prefill (integer GEMMs), w4a16 decode (4-bit MatMulNBits)
    assert info["phases"]["prefill"]["scheme"] == "w8a8" and info["phases"]["decode"]["scheme"] == "w4a16"
    assert info["phases"]["prefill"]["ops"]["com.microsoft::MatMulIntegerToFloat"] == 14
    assert info["phases"]["decode"]["ops"]["com.microsoft::MatMulNBits"] == 2 * 4 + 1  # q/k/v, gate/up packed
    proc = twophase("diff", str(compiled / "prefill.onnx"), str(compiled / "decode.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert "past_key_values.0.key" in proc.stdout
    d = json.loads(twophase("diff", str(compiled / "prefill.onnx"), str(compiled / "decode.onnx"), "--json").stdout)
    assert d["op_delta"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["compile", "no-such-model", "-o", "{tmp}/x"], "not a model in the zoo"),
        (["compile", "{tmp}/missing.onnx", "-o", "{tmp}/x"], "no such file"),
        (["compile", "smollm2-135m-instruct", "-o", "{tmp}/x", "--prefill", "int3"], "--prefill 'int3' is not one of"),
        (["compile", "smollm2-135m-instruct", "-o", "{tmp}/x", "--decode", "w4a16-static"], "only w8a8 takes"),
        (["compile", "smollm2-135m-instruct", "-o", "{tmp}/x", "--block-size", "48"], "power of two"),
        (["compile", "smollm2-135m-instruct", "-o", "{tmp}/x", "--smoothquant", "lots"], "neither a number"),
        (["compile", "smollm2-135m-instruct", "-o", "{tmp}/x", "--algorithm", "magic"], "--algorithm 'magic'"),
        (["compile", "smollm2-135m-instruct", "-o", "{tmp}/x", "--kv-cache", "paged"], "--kv-cache 'paged'"),
        (["compile", "smollm2-135m-instruct", "-o", "{tmp}/x", "--kv-dtype", "int4"], "--kv-dtype 'int4'"),
        (["compile", "smollm2-135m-instruct", "-o", "{tmp}/x", "--prefill-chunk", "0"], "--prefill-chunk"),
        (["run", "{tmp}", "--prompt", "hi"], "manifest"),
        (["diff", "{tmp}/a.onnx", "{tmp}/b.onnx"], "no such file"),
    ],
)
def test_errors_exit_2_with_a_named_cause(tmp_path, args, message):
    proc = twophase(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_prompt_longer_than_context_is_refused(compiled):
    proc = twophase("run", str(compiled), "--prompt", "a" * 300, "--max-new-tokens", "4")
    assert proc.returncode == 2
    assert "context" in proc.stderr and "128" in proc.stderr


def test_tampered_artifact_is_refused(tmp_path, compiled):
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(compiled, copy)
    with open(copy / "weights.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x7f")
    proc = twophase("run", str(copy), "--prompt", "hi")
    assert proc.returncode == 2
    assert "weights.bin" in proc.stderr
