"""Face embedding / landmarks / mask rectangle.

* mask boxes: exact against upstream's ``expand_region`` / ``get_face_mask`` (tests/goldens/vision);
* insightface: the real ``FaceAnalysis`` loading and inference code over five stand-in ONNX models
  written with ``onnx.helper`` at test time (no real weights are available offline);
* MediaPipe: the real Tasks ``FaceLandmarker`` over a stand-in ``.task`` built from the face models
  that the mediapipe 0.10.21 wheel ships (downloaded once into the pytest cache). The stand-in's points
  are not accurate, so only the plumbing is checked with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from safetensors.torch import load_file

from hallo3_worker.conditioning.face import (
    LANDMARKER_FILENAME,
    SILHOUETTE_IDS,
    FaceAnalyzer,
    FaceEmbedder,
    FaceLandmarker,
    FaceRegion,
    expand_region,
    face_mask_from_box,
    onnx_providers,
    oval_bounds,
)
from hallo3_worker.errors import ErrorCode, InputError
from hallo3_worker.interface import Framing

# insightface's face_align (2.1 as 0.7.3) calls a scikit-image API deprecated in 0.26
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")

GOLDENS = Path(__file__).resolve().parents[1] / "goldens" / "vision"
MEDIAPIPE_WHEEL_VERSION = "0.10.21"


@pytest.fixture(scope="module")
def cases() -> dict:
    return json.loads((GOLDENS / "cases.json").read_text())


# ------------------------------------------------------------------------------ mask geometry goldens


def test_expand_region_matches_upstream(cases) -> None:
    assert len(cases["expand_region_cases"]) >= 40
    for case in cases["expand_region_cases"]:
        got = expand_region(case["region"], case["image_w"], case["image_h"], case["expand_ratio"])
        assert list(got) == case["result"], case


def test_face_mask_boxes_match_upstream(cases) -> None:
    landmarks = load_file(str(GOLDENS / "mask_landmarks.safetensors"))
    for case in cases["mask_cases"]:
        lmk = landmarks[case["name"]].numpy()
        assert list(oval_bounds(lmk)) == case["oval_min_max"]
        region = FaceRegion.from_landmarks(
            lmk, case["height"], case["width"], framing=Framing.UPSTREAM, expand_ratio=case["expand_ratio"]
        )
        assert list(region.mask_box) == case["box_min_x_max_x_min_y_max_y"], case["name"]
        want = np.asarray(Image.open(GOLDENS / case["mask_file"]))
        np.testing.assert_array_equal(region.mask(), want, err_msg=case["name"])
        assert int((region.mask() > 0).sum()) == case["mask_nonzero"]


def test_only_the_36_oval_points_define_the_box() -> None:
    rng = np.random.default_rng(0)
    lmk = rng.uniform(0, 300, (478, 2))
    oval = np.zeros(478, bool)
    oval[list(SILHOUETTE_IDS)] = True
    lmk[oval] = rng.uniform(100, 150, (36, 2))
    lmk[~oval] = np.where(rng.random((478 - 36, 2)) < 0.5, 5.0, 295.0)  # far outside the oval
    min_x, max_x, min_y, max_y = oval_bounds(lmk)
    assert 100 <= min_x and max_x <= 150 and 100 <= min_y and max_y <= 150


def test_edge_case_upstream_keeps_a_strip_auto_clamps(cases) -> None:
    landmarks = load_file(str(GOLDENS / "mask_landmarks.safetensors"))
    case = next(c for c in cases["mask_cases"] if c["name"] == "wider_than_image")
    lmk = landmarks["wider_than_image"].numpy()
    up = FaceRegion.from_landmarks(lmk, case["height"], case["width"], framing=Framing.UPSTREAM)
    auto = FaceRegion.from_landmarks(lmk, case["height"], case["width"], framing=Framing.AUTO)
    min_x, max_x, min_y, max_y = up.mask_box
    assert min_x < 0 and max_x == case["width"]
    # upstream: the negative slice start wraps, only a -min_x wide strip at the right edge is masked
    cols = np.flatnonzero(up.mask().any(axis=0))
    assert cols.min() == case["width"] + min_x and cols.max() == case["width"] - 1
    # auto: the whole width of the same rows is masked
    assert auto.mask_box == (0, max_x, min_y, max_y)
    np.testing.assert_array_equal(np.flatnonzero(auto.mask().any(axis=0)), np.arange(case["width"]))
    # away from the image border both modes agree
    inner = next(c for c in cases["mask_cases"] if c["name"] == "inside_half_values")
    lmk2 = landmarks["inside_half_values"].numpy()
    assert (
        FaceRegion.from_landmarks(lmk2, inner["height"], inner["width"], framing=Framing.AUTO).mask_box
        == FaceRegion.from_landmarks(lmk2, inner["height"], inner["width"]).mask_box
    )


def test_face_mask_from_box() -> None:
    mask = face_mask_from_box((2, 5, 1, 3), 4, 6)
    assert mask.dtype == np.uint8
    assert mask.tolist() == [[0] * 6, [0, 0, 255, 255, 255, 0], [0, 0, 255, 255, 255, 0], [0] * 6]


# ------------------------------------------------------------------------- insightface stand-in models

DET = 640
STRIDES = (8, 16, 32)
ANCHORS = 2
# (stride, grid x, grid y, half size px in detector input, score): a big face and a small one whose
# score is higher, so that score order and size order disagree.
BIG_FACE = (32, 9, 7, 68.0, 0.90)
SMALL_FACE = (16, 30, 30, 20.0, 0.97)


def _gap_linear_model(path: Path, size: int, out_dim: int, seed: int, bias: bool = True) -> np.ndarray:
    """(1, 3, size, size) -> GlobalAveragePool -> Flatten -> MatMul W (3, out_dim) [+ b] -> (1, out_dim)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 1, (3, out_dim)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W")]
    nodes = [
        helper.make_node("GlobalAveragePool", ["data"], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["lin" if bias else "out"], name="linear"),
    ]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (out_dim,)).astype(np.float32), "B"))
        nodes.append(helper.make_node("Add", ["lin", "B"], ["out"], name="add_bias"))
    graph = helper.make_graph(
        nodes,
        "standin",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, out_dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return weight


def _detector_model(path: Path, faces: list[tuple]) -> None:
    """SCRFD-layout detector (9 outputs: scores, boxes, keypoints for strides 8/16/32) with constant
    predictions: each face is one anchor with a square box and five keypoints."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    outputs, nodes, inits, infos = {}, [], [], []
    for stride in STRIDES:
        n = (DET // stride) ** 2 * ANCHORS
        outputs[stride] = [
            np.full((n, 1), 0.01, np.float32),
            np.ones((n, 4), np.float32),
            np.zeros((n, 10), np.float32),
        ]
    for stride, gx, gy, half, score in faces:
        k = (gy * (DET // stride) + gx) * ANCHORS
        scores, boxes, kps = outputs[stride]
        scores[k] = score
        boxes[k] = half / stride
        offsets = np.array([[-0.35, -0.3], [0.35, -0.3], [0.0, 0.05], [-0.3, 0.4], [0.3, 0.4]]) * half
        kps[k] = (offsets / stride).reshape(-1)
    # a zero-weighted dependence on the input keeps the graph connected
    nodes.append(helper.make_node("ReduceMean", ["input.1"], ["mean"], name="mean", keepdims=0))
    inits.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    nodes.append(helper.make_node("Mul", ["mean", "zero"], ["nothing"], name="nothing"))
    names = []
    for kind in range(3):  # scores x3, boxes x3, kps x3, the order insightface reads them in
        for stride in STRIDES:
            arr = outputs[stride][kind]
            name = f"out_{kind}_{stride}"
            inits.append(numpy_helper.from_array(arr, f"c_{name}"))
            nodes.append(helper.make_node("Add", [f"c_{name}", "nothing"], [name], name=f"add_{name}"))
            infos.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(arr.shape)))
            names.append(name)
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DET, DET])],
        infos,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _face_analysis_dir(root: Path, faces: list[tuple]) -> np.ndarray:
    models = root / "models"
    models.mkdir(parents=True)
    _detector_model(models / "scrfd_10g_bnkps.onnx", faces)
    arcface_w = _gap_linear_model(models / "glintr100.onnx", 112, 512, seed=1, bias=False)
    _gap_linear_model(models / "2d106det.onnx", 192, 212, seed=2)
    _gap_linear_model(models / "1k3d68.onnx", 192, 3309, seed=3)
    _gap_linear_model(models / "genderage.onnx", 96, 3, seed=4)
    return arcface_w


@pytest.fixture(scope="module")
def face_models(tmp_path_factory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("face_analysis")
    return root, _face_analysis_dir(root, [BIG_FACE, SMALL_FACE])


@pytest.fixture(scope="module")
def embedder(face_models):
    emb = FaceEmbedder(face_models[0], providers=["CPUExecutionProvider"])
    yield emb
    emb.close()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut())


def test_face_analysis_loads_all_five_models(embedder) -> None:
    assert embedder.tasks == ["detection", "genderage", "landmark_2d_106", "landmark_3d_68", "recognition"]


def test_largest_face_raw_embedding(embedder, face_models, astronaut) -> None:
    import cv2
    from insightface.utils import face_align

    face = embedder.detect(astronaut)
    # the detector input is the 512x512 image scaled to 640 (det_scale 1.25)
    stride, gx, gy, half, _ = BIG_FACE
    cx, cy = gx * stride, gy * stride
    np.testing.assert_allclose(face.bbox, np.array([cx - half, cy - half, cx + half, cy + half]) / 1.25, rtol=1e-5)
    assert face.det_score == pytest.approx(BIG_FACE[4])
    # the embedding is the stand-in ArcFace applied to insightface's aligned crop of the BIG face,
    # unnormalised (upstream uses face["embedding"], not normed_embedding)
    offsets = np.array([[-0.35, -0.3], [0.35, -0.3], [0.0, 0.05], [-0.3, 0.4], [0.3, 0.4]]) * half
    kps = (np.array([cx, cy]) + offsets) / 1.25
    crop = face_align.norm_crop(cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR), landmark=kps, image_size=112)
    rgb = crop[..., ::-1].astype(np.float32)
    expected = ((rgb - 127.5) / 127.5).mean(axis=(0, 1)) @ face_models[1]
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    np.testing.assert_allclose(face.embedding, expected, rtol=1e-4, atol=1e-5)
    assert abs(float(np.linalg.norm(face.embedding)) - 1.0) > 0.1


def test_no_face_raises_no_face(tmp_path, astronaut) -> None:
    _face_analysis_dir(tmp_path, [])
    emb = FaceEmbedder(tmp_path / "models", providers=["CPUExecutionProvider"])  # the models dir works too
    try:
        with pytest.raises(InputError) as err:
            emb.detect(astronaut)
        assert err.value.code == ErrorCode.NO_FACE
    finally:
        emb.close()
    with pytest.raises(RuntimeError):
        emb.detect(astronaut)
    emb.close()  # idempotent


def test_missing_models_dir_fails_without_download(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        FaceEmbedder(tmp_path / "nowhere")
    (tmp_path / "empty" / "models").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        FaceEmbedder(tmp_path / "empty")


def test_onnx_providers(monkeypatch) -> None:
    import onnxruntime

    assert onnx_providers()[-1] == "CPUExecutionProvider"
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert onnx_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(prefer_gpu=False) == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_providers() == ["CPUExecutionProvider"]


# ------------------------------------------------------------------------------- MediaPipe stand-in


@pytest.fixture(scope="session")
def landmarker_task(pytestconfig) -> Path:
    """A FaceLandmarker ``.task`` bundle made of the face models shipped in the mediapipe 0.10.21 wheel."""
    cache = Path(pytestconfig.cache.mkdir(f"mediapipe-{MEDIAPIPE_WHEEL_VERSION}"))
    task = cache / "standin_face_landmarker.task"
    if task.is_file():
        return task
    wheels = sorted(cache.glob(f"mediapipe-{MEDIAPIPE_WHEEL_VERSION}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache),
               f"mediapipe=={MEDIAPIPE_WHEEL_VERSION}"]  # fmt: skip
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot download the mediapipe {MEDIAPIPE_WHEEL_VERSION} wheel for a stand-in .task: {exc}")
        wheels = sorted(cache.glob(f"mediapipe-{MEDIAPIPE_WHEEL_VERSION}-*.whl"))
        if proc.returncode != 0 or not wheels:
            pytest.skip(
                f"cannot download the mediapipe {MEDIAPIPE_WHEEL_VERSION} wheel (PyPI unreachable?): {proc.stderr[-500:]}"
            )
    with zipfile.ZipFile(wheels[-1]) as wheel:
        detector = wheel.read("mediapipe/modules/face_detection/face_detection_short_range.tflite")
        landmarks = wheel.read("mediapipe/modules/face_landmark/face_landmark.tflite")
    partial = task.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w") as bundle:
        bundle.writestr("face_detector.tflite", detector)
        bundle.writestr("face_landmarks_detector.tflite", landmarks)
    partial.replace(task)
    return task


def test_landmarker_plumbing(landmarker_task, astronaut) -> None:
    landmarker = FaceLandmarker(landmarker_task)
    try:
        points = landmarker.landmarks(astronaut)
        assert points.shape == (478, 2) and points.dtype == np.float64
        # the stand-in's points are not accurate, but they are pixels around the astronaut's face
        centre = points[list(SILHOUETTE_IDS)].mean(axis=0)
        assert 150 < centre[0] < 300 and 50 < centre[1] < 200
        with pytest.raises(InputError) as err:
            landmarker.landmarks(np.zeros((256, 256, 3), np.uint8))
        assert err.value.code == ErrorCode.NO_FACE
    finally:
        landmarker.close()
    landmarker.close()
    with pytest.raises(RuntimeError):
        landmarker.landmarks(astronaut)


def test_face_analyzer_end_to_end(tmp_path, landmarker_task, astronaut) -> None:
    _face_analysis_dir(tmp_path, [BIG_FACE])
    (tmp_path / "models" / LANDMARKER_FILENAME).write_bytes(landmarker_task.read_bytes())
    with FaceAnalyzer(tmp_path, providers=["CPUExecutionProvider"]) as analyzer:
        for _ in range(2):  # reused across jobs
            result = analyzer.analyze(astronaut)
            assert result.embedding.shape == (512,)
            assert result.mask.shape == (512, 512) and set(np.unique(result.mask)) == {0, 255}
            min_x, max_x, min_y, max_y = result.region.mask_box
            assert 0 <= min_x < max_x <= 512 and 0 <= min_y < max_y <= 512
            np.testing.assert_array_equal(result.mask, face_mask_from_box(result.region.mask_box, 512, 512))
            expected_box = expand_region(oval_bounds(result.region.landmarks), 512, 512, 1.2)
            assert result.region.mask_box == expected_box
        with pytest.raises(InputError) as err:
            analyzer.analyze(np.full((300, 300, 3), 128, np.uint8))
        assert err.value.code == ErrorCode.NO_FACE
