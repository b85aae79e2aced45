"""The tiny model's stand-in vocal separator: its embedded ONNX bytes are the model onnx's helpers build."""

from __future__ import annotations

import numpy as np
import pytest

from hallo3_worker.conditioning.tiny_assets import HALF_GAIN_ONNX


def test_embedded_onnx_is_the_half_gain_model_onnx_builds() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    shape = ["batch", 4, "dim_f", "dim_t"]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "half"], ["output"])],
        "fake_vocal_separator",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
        initializer=[helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    assert model.SerializeToString() == HALF_GAIN_ONNX


def test_embedded_onnx_halves_its_input_in_onnx_runtime() -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(HALF_GAIN_ONNX, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 5)).astype(np.float32)
    (out,) = session.run(None, {"input": x})
    np.testing.assert_array_equal(out, x * 0.5)
