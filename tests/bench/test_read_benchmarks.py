"""benchmarks/decode_vs_read.py and decode_after_idle.py run end to end on a tiny artifact, and refuse bad arguments
with a message."""

import os
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run(*args: str, script: str = "decode_vs_read.py") -> subprocess.CompletedProcess:
    env = dict(os.environ, TVM_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_reports_sextiles(tiny_artifact):
    out = run("--artifact", str(tiny_artifact("gqa")), "--rounds", "12", "--steps", "2", "--prompt", "32")
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^\| (\d) \| ([\d.]+) \| ([\d.na]+) \| ([\d.]+) \| (\d+)% \|$", out.stdout, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
    reads = [float(r[1]) for r in rows]
    assert reads == sorted(reads) and reads[0] > 0  # sextiles of the numpy read, in order
    assert all(float(r[3]) > 0 for r in rows)
    assert "correlation with the decode rate" in out.stdout


def test_bad_arguments(tiny_artifact):
    out = run("--rounds", "3")
    assert out.returncode != 0 and "--rounds must be at least 6" in out.stderr
    out = run("--artifact", str(tiny_artifact("gqa")), "--prompt", "100")  # the tiny model's max_len is 128
    assert out.returncode != 0 and "more than the artifact's max_len 128" in out.stderr and "Traceback" not in out.stderr
    out = run("--artifact", "/nonexistent/artifact")
    assert out.returncode != 0 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_after_idle_reports_each_prelude(tiny_artifact):
    out = run("--artifact", str(tiny_artifact("gqa")), "--reps", "2", "--steps", "4", "--before", "0.05", "--prompt",
              "32", script="decode_after_idle.py")
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+)-([\d.]+) \|$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["idle", "read", "spin", "decode"]
    assert all(float(r[2]) <= float(r[1]) <= float(r[3]) and float(r[1]) > 0 for r in rows)  # median within quartiles


def test_after_idle_bad_arguments(tiny_artifact):
    out = run("--before", "0", script="decode_after_idle.py")
    assert out.returncode != 0 and "--before positive" in out.stderr
    out = run("--artifact", str(tiny_artifact("gqa")), "--steps", "64", script="decode_after_idle.py")
    assert out.returncode != 0 and "more than the artifact's max_len 128" in out.stderr and "Traceback" not in out.stderr
