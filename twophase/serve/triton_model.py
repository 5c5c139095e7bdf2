"""Triton Inference Server Python-backend model: twophase's generation loop over two ONNX Runtime models.

`twophase serve-config --target triton` copies this file to `<repo>/<name>/1/model.py`. Triton runs it
with `triton_python_backend_utils` importable and twophase's runtime installed in the backend's Python
(numpy, onnxruntime, tokenizers, jinja2; no torch). Each request (`prompt`, optional `max_tokens`,
`temperature`, `top_p`, `seed`) is tokenized, prefilled by the `<name>_prefill` model, then decoded one
token at a time by the `<name>_decode` model through BLS calls, with the artifact's own Sampler,
KVCache ("grow" binding: past in, present out) and incremental detokenizer; the response is `text`.
Requests in one `execute` call run one after another (Triton's instance_group count gives parallelism).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from twophase.runtime.artifact import load_manifest
from twophase.runtime.kv_cache import KVCache
from twophase.runtime.sampler import Sampler, SamplingParams
from twophase.runtime.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 64


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.prefill_model = params["prefill_model"]
        self.decode_model = params["decode_model"]
        here = Path(args["model_repository"]) / str(args["model_version"])  # manifest + tokenizer files
        self.manifest = load_manifest(here, verify=False)
        self.tokenizer = Tokenizer.from_artifact(here, self.manifest)
        self.facts = self.manifest.model
        self.max_len = int(self.manifest.kv_cache["max_len"])
        self.eos = frozenset(self.manifest.generation.get("eos_token_ids") or self.facts.eos_token_ids)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                text = self._generate(request)
                out = pb_utils.Tensor("text", np.array([text.encode("utf-8")], dtype=np.object_))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except (ValueError, pb_utils.TritonModelException) as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses

    def _generate(self, request) -> str:
        prompt = _scalar(request, "prompt")
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8")
        max_tokens = int(_scalar(request, "max_tokens", DEFAULT_MAX_TOKENS))
        params = SamplingParams(temperature=float(_scalar(request, "temperature", 0.0)),
                                top_p=float(_scalar(request, "top_p", 1.0)),
                                seed=None if _scalar(request, "seed") is None else int(_scalar(request, "seed")))
        ids = np.array([self.tokenizer.encode(prompt)], dtype=np.int64)  # (1, S)
        if ids.size == 0 or ids.size + max_tokens > self.max_len or max_tokens < 1:
            raise ValueError(f"prompt of {ids.size} tokens + max_tokens {max_tokens} must fit the context of "
                             f"{self.max_len} tokens (and both must be positive)")
        cache = KVCache.for_model(self.facts, self.max_len)
        sampler = Sampler(params)
        detok = self.tokenizer.detokenizer()
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
        outs = self._run(self.prefill_model, feeds, cache.present_names)
        cache.update(outs)
        text = []
        for step in range(max_tokens):
            token = int(sampler.sample(outs["logits"][:, -1, :])[0])
            if token in self.eos:
                break
            text.append(detok.add(token))
            if step + 1 == max_tokens:
                break
            feeds = cache.feeds()
            feeds["input_ids"] = np.array([[token]], dtype=np.int64)
            feeds["attention_mask"] = cache.next_attention_mask()
            feeds["position_ids"] = cache.next_position_ids()
            outs = self._run(self.decode_model, feeds, cache.present_names)
            cache.update(outs)
        return "".join(text) + detok.flush()

    def _run(self, model: str, feeds: dict[str, np.ndarray], present: list[str]) -> dict[str, np.ndarray]:
        """One BLS call: the phase model's logits and present K/V as numpy arrays."""
        names = ["logits", *present]
        inputs = [pb_utils.Tensor(name, np.ascontiguousarray(array)) for name, array in feeds.items()]
        response = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=names).exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"{model}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in names}


def _scalar(request, name: str, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0]
