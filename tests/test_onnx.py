"""ONNX export (nasopt.deploy.onnx): float32 and int8 QDQ files run in ONNX Runtime and agree with
PyTorch on real samples, for random archs of every space with a supernet."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from nasopt.deploy import onnx as onnx_export
from nasopt.core.errors import NasoptError
from nasopt.search.evaluate import Evaluator


def _archs(space, n, seed=0):
    rng = random.Random(seed)
    # compression genes sampled too: sub-8-bit weights, sparsity, low rank all reach the export
    return [space.sample(rng) for _ in range(n)]


def test_fp32_and_int8_round_trip(trained, tmp_path):
    space, supernet, data = trained
    evaluator = Evaluator(space, supernet, data, calib_samples=256)
    x_val, y_val = data.x_val[:300], data.y_val[:300]
    calib = data.x_train[:256]
    written = 0
    # mobilenet graphs take seconds to quantize on 2 shared cores: one arch there
    for i, arch in enumerate(_archs(space, 3 if space.name == "conv1d" else 1)):
        model, _ = evaluator.compressed(arch)
        folder = tmp_path / f"a{i}"
        folder.mkdir()
        with torch.no_grad():
            ref = model.eval()(x_val).numpy()
        try:
            record = onnx_export.write(model, folder, space.input_shape, ("onnx", "onnx-int8"),
                                       calib, x_val, y_val)
        except onnx_export.Int8CheckFailed as refused:
            # the fixtures' supernets train for seconds: on a subnet's near-tied logits the int8
            # rule (a rule for trained models) may refuse. Then the refusal is the rule applied
            # to the graph's true agreement and accuracy, and only the verified float file is kept
            int8 = onnx_export.quantize_int8(onnx_export.to_onnx_bytes(
                onnx_export.plain(model), space.input_shape), calib.numpy())
            got = onnx_export.run(onnx_export.session(int8), x_val).argmax(1)
            agreement = float((got == ref.argmax(1)).mean())
            labels = y_val.numpy()
            drop = float((ref.argmax(1) == labels).mean() - (got == labels).mean())
            assert (agreement < onnx_export.INT8_MIN_AGREEMENT
                    or drop > onnx_export.INT8_MAX_ACCURACY_DROP), (agreement, drop)
            assert f"agree on {agreement:.1%}" in str(refused) or "accuracy drops" in str(refused)
            assert (folder / onnx_export.FP32_FILE).exists()
            assert not (folder / onnx_export.INT8_FILE).exists()
            got = onnx_export.run(onnx_export.session(folder / onnx_export.FP32_FILE), x_val, 37)
            assert np.abs(ref - got).max() < onnx_export.FP32_TOLERANCE
            continue
        written += 1
        assert record["onnx"]["max_abs_diff"] < onnx_export.FP32_TOLERANCE
        # the files on disk, run again in a fresh session, batch size other than 1
        got = onnx_export.run(onnx_export.session(folder / onnx_export.FP32_FILE), x_val, 37)
        assert np.abs(ref - got).max() < onnx_export.FP32_TOLERANCE
        int8 = onnx_export.run(onnx_export.session(folder / onnx_export.INT8_FILE), x_val)
        agreement = float((int8.argmax(1) == ref.argmax(1)).mean())
        assert agreement == pytest.approx(record["onnx-int8"]["agreement"])
        assert agreement >= onnx_export.INT8_MIN_AGREEMENT
        import onnx
        ops = {n.op_type for n in onnx.load(str(folder / onnx_export.INT8_FILE)).graph.node}
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    if space.name == "conv1d":  # the int8 files themselves are checked on this space's archs
        assert written >= 1


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


def test_run_keeps_its_files_when_the_int8_graph_fails_its_check(trained, tmp_path,
                                                                  monkeypatch):
    """`nasopt run`'s export step: an int8 graph outside the tolerances is not written, the card
    says why, and the float32 file (and the run) stay; `nasopt export` still refuses it."""
    space, supernet, data = trained
    if space.name != "conv1d":
        pytest.skip("the rule does not depend on the space")
    model, _ = Evaluator(space, supernet, data, calib_samples=256).compressed(space.largest())
    monkeypatch.setattr(onnx_export, "INT8_MIN_AGREEMENT", 1.01)  # no graph can pass
    said = []
    got = onnx_export.pipeline_export(model, tmp_path, space, data, ["onnx", "onnx-int8"],
                                      said.append)
    assert (tmp_path / onnx_export.FP32_FILE).exists()
    assert not (tmp_path / onnx_export.INT8_FILE).exists()
    reason = got["onnx"]["onnx-int8"]["not_written"]
    assert "int8 verification failed" in reason and "need >= 101%" in reason
    assert said == [f"{onnx_export.INT8_FILE} not written: {reason}"]
    assert list(got["test"]) == [f"{onnx_export.FP32_FILE} via ONNX Runtime"]
    from nasopt.pipeline import int8_not_written
    assert int8_not_written({"formats": {"onnx": got["onnx"]}}) == reason  # REPORT.md's line
    with pytest.raises(NasoptError, match="int8 verification failed"):
        onnx_export.write(model, tmp_path / "x", space.input_shape, ["onnx-int8"],
                          data.x_train[:256], data.x_val, data.y_val)
    assert not (tmp_path / "x").exists()
