"""Roofline measurements: byte and op accounting, the decode model, argument checks, and that each
measurement runs at small sizes and returns positive finite numbers (no assertions on speed)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from twophase.bench import roofline
from twophase.bench.roofline import (
    MIB,
    BandwidthSource,
    StreamKernel,
    decode_bytes_per_token,
    gemm_ops,
    measure_bandwidth,
    measure_bandwidth_ort,
    measure_gemm_peak,
    roofline_tokens_per_s,
    stream_bytes,
)


def test_stream_byte_counting():
    assert stream_bytes(StreamKernel.COPY, 1000, 8) == 16_000
    assert stream_bytes(StreamKernel.SCALE, 1000, 4) == 8_000
    assert stream_bytes(StreamKernel.ADD, 1000, 4) == 12_000
    assert stream_bytes(StreamKernel.TRIAD, 1000, 8) == 24_000
    assert stream_bytes(StreamKernel.READ, 1000, 8) == 8_000


def test_gemm_op_counting():
    assert gemm_ops(2, 3, 4) == 48
    assert gemm_ops(1024, 1024, 1024) == 2 * 1024**3


def test_decode_bytes_per_token():
    # one row: all weights plus 50 positions of 10 bytes
    assert decode_bytes_per_token(1000, 10, 50) == 1500
    # four rows share the weights, each reads its own KV: (1000 + 4 * 50 * 10) / 4
    assert decode_bytes_per_token(1000, 10, 50, batch=4) == 750
    assert decode_bytes_per_token(1000, 10, 0, batch=2) == 500
    # SmolLM2-135M-like: 270 MB of fp16-sized weights, 30 layers x 3 kv heads x 64 dims x K,V x 4 B
    kv = 2 * 30 * 3 * 64 * 4
    assert kv == 46_080
    assert decode_bytes_per_token(270_000_000, kv, 1000) == 270_000_000 + 46_080_000


def test_roofline_tokens_per_s():
    assert roofline_tokens_per_s(1e9, 20.0) == 20.0
    assert roofline_tokens_per_s(250e6, 20.0) == 80.0
    # chained: batch 4 reads weights once per step, so aggregate tokens/s grows with batch
    one = roofline_tokens_per_s(decode_bytes_per_token(1_000_000, 0, 0, batch=1), 1.0)
    four = roofline_tokens_per_s(decode_bytes_per_token(1_000_000, 0, 0, batch=4), 1.0)
    assert (one, four) == (1000.0, 4000.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_bytes": -1, "kv_bytes_per_position": 0, "context": 0}, "byte counts"),
        ({"weight_bytes": 1, "kv_bytes_per_position": -1, "context": 0}, "byte counts"),
        ({"weight_bytes": 1, "kv_bytes_per_position": 1, "context": -1}, "context"),
        ({"weight_bytes": 1, "kv_bytes_per_position": 1, "context": 1, "batch": 0}, "batch"),
    ],
)
def test_decode_bytes_per_token_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decode_bytes_per_token(**kwargs)


@pytest.mark.parametrize(("nbytes", "gbs", "match"), [(0, 1.0, "bytes_per_token"), (1.0, 0, "bandwidth_gbs"),
                                                      (1.0, float("nan"), "bandwidth_gbs")])  # fmt: skip
def test_roofline_tokens_per_s_rejects(nbytes, gbs, match):
    with pytest.raises(ValueError, match=match):
        roofline_tokens_per_s(nbytes, gbs)


@pytest.mark.parametrize("measure", [measure_bandwidth, measure_bandwidth_ort])
def test_bandwidth_rejects_bad_arguments(measure):
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        measure(threads=0, size_mb=4)
    with pytest.raises(ValueError, match="reps must be >= 1"):
        measure(threads=1, size_mb=4, reps=0)
    with pytest.raises(ValueError, match=r"size_mb=1 is too small for threads=2.*size_mb >= 2"):
        measure(threads=2, size_mb=1)
    with pytest.raises(ValueError, match="size_mb=0 is too small"):
        measure(threads=1, size_mb=0)


def test_gemm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="threads must be >= 1, got -1"):
        measure_gemm_peak(threads=-1)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        measure_gemm_peak(threads=1, m=4, n=4, k=0)


def _check_bandwidth(result, source, kernels, itemsize, threads):
    assert result.source is source
    assert result.threads == threads
    assert result.array_mib == 2
    assert result.reps == 2
    assert [k.kernel for k in result.kernels] == kernels
    elements = 2 * MIB // itemsize
    for k in result.kernels:
        assert k.bytes_per_rep == k.kernel.arrays * elements * itemsize
        assert math.isfinite(k.median_gbs) and k.median_gbs > 0
        assert math.isfinite(k.best_gbs) and k.best_gbs >= k.median_gbs
    assert result.kernel(StreamKernel.READ) is result.kernels[-1]
    assert math.isfinite(result.cpu_share) and result.cpu_share > 0
    d = json.loads(json.dumps(result.to_dict()))
    assert d["source"] == source.value
    assert set(d["kernels"]) == {k.value for k in kernels}
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.threads = 3


@pytest.mark.parametrize("threads", [1, 2])
def test_measure_bandwidth_numpy(threads):
    result = measure_bandwidth(threads=threads, size_mb=2, reps=2)
    kernels = [StreamKernel.COPY, StreamKernel.TRIAD, StreamKernel.READ]
    _check_bandwidth(result, BandwidthSource.NUMPY, kernels, 8, threads)
    assert result.dtype == "float64"
    with pytest.raises(KeyError, match="no 'add' kernel"):
        result.kernel(StreamKernel.ADD)


def test_measure_bandwidth_ort():
    pytest.importorskip("onnx")
    result = measure_bandwidth_ort(threads=2, size_mb=2, reps=2)
    kernels = [StreamKernel.SCALE, StreamKernel.ADD, StreamKernel.READ]
    _check_bandwidth(result, BandwidthSource.ONNXRUNTIME, kernels, 4, 2)
    assert result.dtype == "float32"


def test_measure_gemm_peak():
    pytest.importorskip("onnx")
    result = measure_gemm_peak(threads=1, m=8, n=32, k=64, reps=2)
    assert (result.m, result.n, result.k, result.threads, result.reps) == (8, 32, 64, 1, 2)
    assert (result.fp32.op, result.int8.op) == ("MatMul", "MatMulInteger")
    for rate, itemsize in ((result.fp32, 4), (result.int8, 1)):
        assert math.isfinite(rate.median_gops) and rate.median_gops > 0
        assert rate.best_gops >= rate.median_gops
        # weight GB/s and GOP/s come from the same median time: their ratio is bytes over ops
        assert rate.weight_gbs / rate.median_gops == pytest.approx(64 * 32 * itemsize / gemm_ops(8, 32, 64))
    assert math.isfinite(result.cpu_share) and result.cpu_share > 0
    d = json.loads(json.dumps(result.to_dict()))
    assert d["int8"]["dtype"] == "uint8 x int8"


def test_parse_cache_size_and_default_size():
    assert roofline._parse_cache_size("491520K") == 480 * MIB
    assert roofline._parse_cache_size("2M") == 2 * MIB
    assert roofline._parse_cache_size("4096") == 4096
    assert roofline.default_array_mib() >= 64


def test_compiled_read():
    """TvmRead: both kernels read every byte (the sink is the XOR of each chunk's lines), bytes are counted once,
    and a thread count other than the pool's is refused by name."""
    tvm = pytest.importorskip("tvm")
    from twophase.bench.roofline import READ_SUBSTREAMS, TvmRead

    pool = tvm.runtime.num_threads()
    reader = TvmRead(threads=pool, size_mb=2 * pool)
    assert reader.chunks == 2 * pool
    data = np.random.default_rng(0).integers(0, 256, tuple(reader._data.shape), dtype=np.uint8)
    reader._data = tvm.runtime.tensor(data)
    result = reader.measure(reps=2)
    np.testing.assert_array_equal(reader._sink.numpy(), np.bitwise_xor.reduce(data.reshape(2 * pool, -1, 64), axis=1))
    assert data.shape[1] == READ_SUBSTREAMS
    assert result.source is BandwidthSource.TVM and result.dtype == "uint8"
    assert [k.kernel for k in result.kernels] == [StreamKernel.READ, StreamKernel.READ_PREFETCH]
    for k in result.kernels:
        assert k.bytes_per_rep == 2 * pool * MIB
        assert math.isfinite(k.median_gbs) and k.best_gbs >= k.median_gbs > 0
    assert json.loads(json.dumps(result.to_dict()))["kernels"].keys() == {"read", "read_prefetch"}
    with pytest.raises(RuntimeError, match=rf"runs {pool} threads, not threads={pool + 1}: set TVM_NUM_THREADS="):
        TvmRead(threads=pool + 1, size_mb=2 * pool + 2)


@pytest.mark.parametrize("threads", [1, 2])
def test_read_probe(threads):
    """ReadProbe: each thread owns one slice of the array (together all of it, touched once), a read is the median
    of its passes in GB/s, and bad arguments are refused by name."""
    from twophase.bench.roofline import ReadProbe

    probe = ReadProbe(threads=threads, size_mb=4)
    assert probe.array_mib == 4 and probe._a.nbytes == 4 * MIB
    assert probe._bounds[0][0] == 0 and probe._bounds[-1][1] == probe._a.size and len(probe._bounds) == threads
    assert (probe._a == 1.0).all()
    assert all(math.isfinite(probe.gbs(p)) and probe.gbs(p) > 0 for p in (1, 3))
    with pytest.raises(ValueError, match="passes must be >= 1"):
        probe.gbs(0)
    with pytest.raises(ValueError, match="size_mb=1 is too small for threads=2"):
        ReadProbe(threads=2, size_mb=1)
