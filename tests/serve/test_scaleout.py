"""`twophase serve-config --target triton`: the generated model repository's structure (each config.pbtxt
parsed back and checked against the ONNX Runtime session of the file it points at), the Python-backend
generation loop run against a stand-in for Triton's BLS API, and the refusals."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest

from twophase.compiler.errors import ArtifactError
from twophase.runtime.engine import Engine
from twophase.serve.scaleout import ScaleOutTarget, write_serve_config

ORT_TYPES = {"tensor(int64)": "TYPE_INT64", "tensor(float)": "TYPE_FP32", "tensor(int32)": "TYPE_INT32"}


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> dict (repeated fields as lists); enough for Triton model configs."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\],:]|[^\s{}\[\],:]+', text)
    pos = 0

    def value(tok: str):
        if tok.startswith('"'):
            return json.loads(tok)
        if tok in ("true", "false"):
            return tok == "true"
        try:
            return int(tok)
        except ValueError:
            return tok  # an enum symbol

    def message(end: str | None) -> dict:
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            if tokens[pos] == "{":
                pos += 1
                item = message("}")
                pos += 1
            elif tokens[pos] == "[":
                pos += 1
                item = []
                while tokens[pos] != "]":
                    if tokens[pos] != ",":
                        item.append(value(tokens[pos]))
                    pos += 1
                pos += 1
            else:
                item = value(tokens[pos])
                pos += 1
            out.setdefault(key, []).append(item)
        return {k: v[0] if len(v) == 1 and k not in ("input", "output", "instance_group", "parameters") else v
                for k, v in out.items()}

    return message(None)


@pytest.fixture(scope="module")
def repo(serve_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    write_serve_config(serve_artifact("grow"), out, ScaleOutTarget.TRITON, model_name="tiny", instances=2)
    return out


def test_repository_structure(repo):
    assert sorted(p.name for p in repo.iterdir()) == ["tiny", "tiny_decode", "tiny_prefill"]
    configs = {d.name: parse_pbtxt((d / "config.pbtxt").read_text()) for d in repo.iterdir()}
    for phase in ("prefill", "decode"):
        cfg = configs[f"tiny_{phase}"]
        assert cfg["name"] == f"tiny_{phase}" and cfg["backend"] == "onnxruntime" and cfg["max_batch_size"] == 0
        assert cfg["default_model_filename"] == f"{phase}.onnx"
        assert cfg["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
        # the version directory loads as is (the graph's external weights resolve next to it)
        session = ort.InferenceSession(str(repo / f"tiny_{phase}" / "1" / cfg["default_model_filename"]))
        for declared, actual in ((cfg["input"], session.get_inputs()), (cfg["output"], session.get_outputs())):
            assert [t["name"] for t in declared] == [a.name for a in actual]
            for t, a in zip(declared, actual):
                assert t["data_type"] == ORT_TYPES[a.type]
                assert t["dims"] == [d if isinstance(d, int) else -1 for d in a.shape]
    cfg = configs["tiny"]
    assert cfg["backend"] == "python" and (repo / "tiny" / "1" / "model.py").is_file()
    assert [t["name"] for t in cfg["input"]] == ["prompt", "max_tokens", "temperature", "top_p", "seed"]
    assert all(t.get("optional") for t in cfg["input"][1:]) and "optional" not in cfg["input"][0]
    assert [t["name"] for t in cfg["output"]] == ["text"] and cfg["output"][0]["data_type"] == "TYPE_STRING"
    params = {p["key"]: p["value"]["string_value"] for p in cfg["parameters"]}
    assert params == {"prefill_model": "tiny_prefill", "decode_model": "tiny_decode"}


def fake_triton(repo) -> types.ModuleType:
    """A stand-in for `triton_python_backend_utils`: BLS requests run the repository's ONNX models with ORT."""
    pb = types.ModuleType("triton_python_backend_utils")
    sessions = {}

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        def __init__(self, msg):
            self._msg = msg

        def message(self):
            return self._msg

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error_ = output_tensors, error

        def has_error(self):
            return self.error_ is not None

        def error(self):
            return self.error_

    class InferenceRequest:
        def __init__(self, model_name, inputs, requested_output_names):
            self.model_name, self.inputs, self.outputs = model_name, inputs, requested_output_names

        def exec(self):
            if self.model_name not in sessions:
                cfg = parse_pbtxt((repo / self.model_name / "config.pbtxt").read_text())
                sessions[self.model_name] = ort.InferenceSession(
                    str(repo / self.model_name / "1" / cfg["default_model_filename"]))
            arrays = sessions[self.model_name].run(self.outputs, {t.name(): t.as_numpy() for t in self.inputs})
            return InferenceResponse([Tensor(n, a) for n, a in zip(self.outputs, arrays)])

    def get_tensor(obj, name):
        tensors = obj.inputs if isinstance(obj, InferenceRequest) else obj.output_tensors
        return next((t for t in tensors if t.name() == name), None)

    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.InferenceRequest = Tensor, TritonError, InferenceResponse, InferenceRequest
    pb.TritonModelException = type("TritonModelException", (Exception,), {})
    pb.get_input_tensor_by_name = pb.get_output_tensor_by_name = get_tensor
    return pb


def test_python_backend_loop_generates_what_the_engine_generates(repo, serve_artifact, monkeypatch):
    pb = fake_triton(repo)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("tiny_triton_model", repo / "tiny" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = json.dumps({"parameters": {"prefill_model": {"string_value": "tiny_prefill"},
                                        "decode_model": {"string_value": "tiny_decode"}}})
    model.initialize({"model_config": config, "model_repository": str(repo / "tiny"), "model_version": "1"})

    def request(prompt, **optional):
        tensors = [pb.Tensor("prompt", np.array([prompt.encode()], dtype=object))]
        tensors += [pb.Tensor(k, np.array([v])) for k, v in optional.items()]
        return pb.InferenceRequest("tiny", tensors, ["text"])

    responses = model.execute([request("hello there", max_tokens=20), request("abc", max_tokens=9),
                               request("abc", max_tokens=10_000)])
    engine = Engine.load(serve_artifact("grow"))
    texts = [r.output_tensors[0].as_numpy()[0].decode() for r in responses[:2]]
    assert texts == [engine.generate("hello there", max_new_tokens=20, stream=False),
                     engine.generate("abc", max_new_tokens=9, stream=False)]
    assert responses[2].has_error() and "context" in responses[2].error().message()


def test_refusals(serve_artifact, tmp_path):
    with pytest.raises(ArtifactError, match="--kv-cache grow"):
        write_serve_config(serve_artifact("bound"), tmp_path / "r", ScaleOutTarget.TRITON)
    assert not (tmp_path / "r").exists()
    (tmp_path / "taken").mkdir()
    proc = subprocess.run([sys.executable, "-m", "twophase.cli", "serve-config", str(serve_artifact("grow")),
                           "-o", str(tmp_path / "taken")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--force" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "twophase.cli", "serve-config", str(serve_artifact("grow")),
                           "-o", str(tmp_path / "x"), "--target", "kserve"], capture_output=True, text=True)
    assert proc.returncode == 2 and "triton" in proc.stderr
