"""The inference runtime (covidcxr.runtime): exported networks, hash checks, named outputs, parity with torch."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from covidcxr.errors import ConfigError, ModelError
from covidcxr.runtime import CLASSIFIER_OUTPUTS, OnnxNetwork, check_precision

TINY_UNET = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "input_size": 32}


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, dict]:
    from covidcxr.models.unet import build_unet, unet_config
    from covidcxr.segmentation.weights import save_unet

    torch.manual_seed(0)
    net = build_unet(TINY_UNET).eval()
    folder = tmp_path_factory.mktemp("unet")
    save_unet(net, TINY_UNET, folder)
    return folder, net, unet_config(TINY_UNET)


def test_save_unet_writes_the_exported_network(unet_dir) -> None:
    folder, _, _ = unet_dir
    cfg = json.loads((folder / "lung_unet.json").read_text())
    assert (folder / "lung_unet.onnx").is_file()
    assert cfg["onnx"]["file"] == "lung_unet.onnx" and cfg["onnx"]["outputs"] == ["logits"]
    assert cfg["onnx"]["weights_sha256"] == cfg["weights_sha256"]
    net = OnnxNetwork(folder / "lung_unet.onnx", sha256=cfg["onnx"]["sha256"])
    assert net.output_names == ["logits"] and net.input_name == "image"


def test_unet_parity_with_torch_float32(unet_dir) -> None:
    # Same images: probability maps and final masks of the ONNX segmenter equal the torch network's in float32.
    from covidcxr.segmentation.segmenter import LungSegmenter, postprocess
    from covidcxr.transforms.joint import prepare_batch

    folder, net, cfg = unet_dir
    rng = np.random.default_rng(0)
    images = [rng.random((50, 40), dtype=np.float32), rng.random((32, 64), dtype=np.float32)]
    seg = LungSegmenter.load(folder)
    got = seg.predict_proba(images)
    with torch.no_grad():
        ref = torch.sigmoid(net(prepare_batch(images, cfg)))[:, 0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(postprocess(g, cfg["threshold"]), postprocess(r, cfg["threshold"]))


def test_segmenter_without_onnx_names_the_export_command(unet_dir, tmp_path: Path) -> None:
    import shutil

    from covidcxr.cli import main
    from covidcxr.segmentation.segmenter import LungSegmenter

    folder, _, _ = unet_dir
    copy = tmp_path / "seg"
    shutil.copytree(folder, copy)
    (copy / "lung_unet.onnx").unlink()
    with pytest.raises(ModelError, match=r"no exported network \(ONNX\).*covidcxr export --segmenter"):
        LungSegmenter.load(copy)
    assert main(["export", "--segmenter", str(copy)]) == 0
    image = np.random.default_rng(1).random((40, 40), dtype=np.float32)
    np.testing.assert_array_equal(LungSegmenter.load(copy).predict_proba([image]),
                                  LungSegmenter.load(folder).predict_proba([image]))


def test_hash_mismatch_and_bad_files_are_refused(unet_dir, tmp_path: Path) -> None:
    folder, _, _ = unet_dir
    with pytest.raises(ModelError, match=r"SHA-256 .* differs"):
        OnnxNetwork(folder / "lung_unet.onnx", sha256="0" * 64)
    with pytest.raises(ModelError, match="missing.*covidcxr export"):
        OnnxNetwork(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelError, match="ONNX Runtime cannot load"):
        OnnxNetwork(tmp_path / "bad.onnx")


def test_run_checks_outputs_and_shapes(unet_dir) -> None:
    folder, _, _ = unet_dir
    net = OnnxNetwork(folder / "lung_unet.onnx")
    x = np.random.default_rng(0).random((5, 1, 32, 32), dtype=np.float32)
    whole = net.run(x)["logits"]
    np.testing.assert_allclose(net.run(x, batch_size=2)["logits"], whole, atol=1e-6)  # chunking changes nothing
    with pytest.raises(ConfigError, match="has outputs"):
        net.run(x, ["embedding"])
    with pytest.raises(ConfigError, match=r"expected \(N, C, H, W\)"):
        net.run(x[0])


@pytest.mark.parametrize(("n", "split", "parts"), [(1, 2, 1), (3, 2, 1), (4, 2, 2), (7, 3, 3), (9, 8, 4)])
def test_split_runs_give_the_same_outputs(unet_dir, n: int, split: int, parts: int) -> None:
    # A batch split into parts run at once on the single-threaded session gives each image's outputs bit for bit as
    # the multi-threaded session does; parts of fewer than two images are not made.
    folder, _, _ = unet_dir
    net = OnnxNetwork(folder / "lung_unet.onnx", threads=2)
    x = np.random.default_rng(n).random((n, 1, 32, 32), dtype=np.float32)
    whole = net.run(x)["logits"]
    got = net.run(x, split=np.int64(split), batch_size=np.int64(2))["logits"]  # numpy integers are integers too
    assert got.shape == whole.shape and got.tobytes() == whole.tobytes()
    assert (net._single is not None) == (parts > 1)
    with pytest.raises(ConfigError, match="split=0"):
        net.run(x, split=0)
    with pytest.raises(ConfigError, match="split=True"):
        net.run(x, split=True)


def test_kernel_threads_sets_and_restores_opencv_and_blas() -> None:
    import cv2
    from threadpoolctl import threadpool_info

    from covidcxr.runtime import kernel_threads

    def blas() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    assert blas(), "numpy's OpenBLAS should be visible to threadpoolctl"
    before = cv2.getNumThreads()
    cv2.setNumThreads(3)  # a setting of the caller's that must come back
    try:
        blas_before = blas()
        with kernel_threads(1):
            assert cv2.getNumThreads() == 1 and set(blas()) == {1}
        assert cv2.getNumThreads() == 3 and blas() == blas_before
        with pytest.raises(RuntimeError, match="inside"), kernel_threads(1):
            raise RuntimeError("inside")
        assert cv2.getNumThreads() == 3 and blas() == blas_before
        # Blocks in two threads that overlap without nesting: the settings come back when the last one ends.
        first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

        def first() -> None:
            with kernel_threads(1):
                first_in.set()
                second_in.wait(5)
            first_out.set()

        worker = threading.Thread(target=first)
        worker.start()
        first_in.wait(5)
        with kernel_threads(1):
            second_in.set()
            first_out.wait(5)
            assert cv2.getNumThreads() == 1  # the first block ended, this one still runs
        worker.join(5)
        assert cv2.getNumThreads() == 3 and blas() == blas_before
    finally:
        cv2.setNumThreads(before)
    with pytest.raises(ConfigError, match="kernel threads n=0"), kernel_threads(0):
        pass


@pytest.mark.parametrize(("precision", "ok"), [("auto", True), ("fp32", True), ("bf16", False), ("fp16", False)])
def test_inference_precision_is_float32(precision: str, ok: bool) -> None:
    if ok:
        assert check_precision(precision) == "fp32"
    else:
        with pytest.raises(ConfigError, match="precision"):
            check_precision(precision)


def test_classifier_graph_outputs_and_cam_algebra(tmp_path: Path, make_tiny_artifact) -> None:
    # class_maps is the head's linear layer at every position of the feature map: its spatial mean plus the bias
    # gives the logits, and the feature map's spatial mean is the embedding (GAP + linear head).
    from covidcxr.classification.artifact import load_artifact

    art = load_artifact(make_tiny_artifact(tmp_path / "m", seed=0), "cpu")
    assert art.network.output_names == list(CLASSIFIER_OUTPUTS)
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    out = art.network.run(x)
    np.testing.assert_allclose(out["feature_map"].mean((2, 3)), out["embedding"], atol=1e-5)
    pooled = out["class_maps"].mean((2, 3))  # W @ embedding, no bias: differs from the logits by the bias only
    bias = out["logits"] - pooled
    np.testing.assert_allclose(bias, np.broadcast_to(bias[0], bias.shape), atol=1e-4)
    assert json.loads((art.directory / "config.json").read_text())["onnx"]["cam_exact"] is True


@pytest.mark.slow
def test_shipped_networks_fit_the_size_budget() -> None:
    from covidcxr.classification.artifact import shipped_model_dir
    from covidcxr.segmentation.weights import default_weights_path

    for path in (shipped_model_dir() / "model.onnx", default_weights_path().with_suffix(".onnx")):
        assert path.stat().st_size <= 15 * 1024 * 1024, path
