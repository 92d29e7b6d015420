"""ONNX export (nasopt.onnx_export): float32 and int8 QDQ files run in ONNX Runtime and agree with
PyTorch on real samples, for random archs of every space with a supernet."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from nasopt import onnx_export
from nasopt.errors import NasoptError
from nasopt.evaluate import Evaluator


def _archs(space, n, seed=0):
    rng = random.Random(seed)
    # compression genes sampled too: sub-8-bit weights, sparsity, low rank all reach the export
    return [space.sample(rng) for _ in range(n)]


def test_fp32_and_int8_round_trip(trained, tmp_path):
    space, supernet, data = trained
    evaluator = Evaluator(space, supernet, data, calib_samples=256)
    x_val, y_val = data.x_val[:300], data.y_val[:300]
    # mobilenet graphs take seconds to quantize on 2 shared cores: one arch there
    for i, arch in enumerate(_archs(space, 3 if space.name == "conv1d" else 1)):
        model, _ = evaluator.compressed(arch)
        folder = tmp_path / f"a{i}"
        folder.mkdir()
        record = onnx_export.write(model, folder, space.input_shape, ("onnx", "onnx-int8"),
                                   data.x_train[:256], x_val, y_val)
        assert record["onnx"]["max_abs_diff"] < onnx_export.FP32_TOLERANCE
        # the files on disk, run again in a fresh session, batch size other than 1
        with torch.no_grad():
            ref = model.eval()(x_val).numpy()
        got = onnx_export.run(onnx_export.session(folder / onnx_export.FP32_FILE), x_val, 37)
        assert np.abs(ref - got).max() < onnx_export.FP32_TOLERANCE
        int8 = onnx_export.run(onnx_export.session(folder / onnx_export.INT8_FILE), x_val)
        agreement = float((int8.argmax(1) == ref.argmax(1)).mean())
        assert agreement == pytest.approx(record["onnx-int8"]["agreement"])
        assert agreement >= onnx_export.INT8_MIN_AGREEMENT
        import onnx
        ops = {n.op_type for n in onnx.load(str(folder / onnx_export.INT8_FILE)).graph.node}
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_int8_verification_rejects_a_wrong_graph(trained):
    space, supernet, data = trained
    if space.name != "conv1d":
        pytest.skip("the check does not depend on the space")
    evaluator = Evaluator(space, supernet, data, calib_samples=256)
    model, _ = evaluator.compressed(space.largest())
    other, _ = evaluator.compressed(space.smallest())
    wrong = onnx_export.to_onnx_bytes(other, space.input_shape)  # another model's graph
    with pytest.raises(NasoptError, match="verification failed"):
        onnx_export.verify_fp32(model, wrong, data.x_val[:64])
