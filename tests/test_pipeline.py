"""The manifest loop's pipeline: overlapping the stages in threads changes nothing in the results (probabilities,
labels, QC flags, gate, embeddings, masks in the cache) and an unreadable file in the middle of a pipelined batch is
still answered per file; the bounded pipeline itself keeps order and raises a stage's error at its item."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr.classification.artifact import load_artifact
from covidcxr.classification.loop import pipelined, predict_manifest
from covidcxr.errors import ConfigError, ImageError

BAD_ROW = 6  # an unreadable file in the middle of the second chunk of 4


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    """A toy model with its own tiny lung U-Net (``mask`` mode) and an out-of-distribution reference."""
    from covidcxr.classification.ood import OODReference
    from covidcxr.web.toy import make_toy_assets

    assets = make_toy_assets(tmp_path_factory.mktemp("toy"), n_cases=9, image_size=72, seg_mode="mask",
                             shipped_segmenter=False)
    art = load_artifact(assets.model_dir, "cpu")
    emb = art.embed([np.asarray(i) for i in _decode(assets.images)])
    ref = OODReference(emb, threshold=0.0)
    # A threshold between the cases' distances, so the gate answers both ways.
    ref.threshold = float(np.median(ref.distances(emb)))
    config_path = assets.model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["ood"] = ref.save(assets.model_dir)
    config_path.write_text(json.dumps(config))
    return assets


def _decode(paths: list[Path]) -> list[np.ndarray]:
    from covidcxr.io.image import load_image

    return [load_image(p)[0] for p in paths]


@pytest.fixture(scope="module")
def rows(toy, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    bad = tmp_path_factory.mktemp("bad") / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image")
    images = [str(p) for p in toy.images] * 2  # 18 rows: five chunks of 4
    images.insert(BAD_ROW, str(bad))
    return pd.DataFrame({"image": images[:18], "patient_id": [f"p{i}" for i in range(18)]})


def _run(toy, rows: pd.DataFrame, *, pipeline: bool, **kwargs):
    art = load_artifact(toy.model_dir, "cpu")
    return predict_manifest(art, rows, batch_size=4, num_workers=2, pipeline=pipeline, **kwargs)


@pytest.mark.parametrize("on_error", ["report", "skip"])
@pytest.mark.parametrize("cache", [False, True], ids=["no_cache", "mask_cache"])
def test_pipelined_loop_equals_serial(toy, rows: pd.DataFrame, tmp_path: Path, on_error: str, cache: bool) -> None:
    out = {}
    for pipeline in (False, True):
        mask_dir = tmp_path / f"masks_{pipeline}" if cache else None
        out[pipeline] = _run(toy, rows, pipeline=pipeline, embeddings=True, on_error=on_error, mask_dir=mask_dir)
    (serial, emb_serial), (piped, emb_piped) = out[False], out[True]
    assert serial["status"].isin(["ok", "no_result"]).any()
    pd.testing.assert_frame_equal(piped, serial, check_exact=True)
    assert piped.attrs == serial.attrs
    assert emb_piped.dtype == emb_serial.dtype and emb_piped.tobytes() == emb_serial.tobytes()
    if cache:  # the same masks and QC flags were cached
        (a,), (b,) = (list((tmp_path / f"masks_{p}").iterdir()) for p in (False, True))
        assert json.loads((a / "qc.json").read_text()) == json.loads((b / "qc.json").read_text())
        for png in sorted(a.glob("*.png")):
            assert png.read_bytes() == (b / png.name).read_bytes()


def test_loop_equals_one_image_at_a_time(toy, rows: pd.DataFrame) -> None:
    # The loop splits each network call over single-threaded sessions and runs OpenCV/BLAS single-threaded
    # (covidcxr.runtime); one image at a time (analyze: one session, the libraries' own threads) gives the same
    # probabilities and embeddings bit for bit, and the loop leaves the libraries' thread settings as it found them.
    import cv2

    art = load_artifact(toy.model_dir, "cpu")
    good = rows.drop(index=BAD_ROW).head(6).reset_index(drop=True)
    before = cv2.getNumThreads()
    table, emb = predict_manifest(art, good, batch_size=4, num_workers=2, embeddings=True)
    assert cv2.getNumThreads() == before
    for i, image in enumerate(_decode(good["image"].tolist())):
        one = art.analyze(image, explain=False)
        assert float(one.prob[0]) == table.loc[i, "prob"]
        assert one.embeddings[0].tobytes() == emb[i].tobytes()
        (gate,) = art.gate(one, [image])
        assert ("ok" if gate.usable else "no_result") == table.loc[i, "status"]
        # The gate's distance is a BLAS product: one thread sums in another order than several (last bits only).
        assert gate.distance == pytest.approx(table.loc[i, "ood_distance"], rel=1e-5, abs=1e-6)


def test_mask_cache_is_filed_under_the_segmenters_graph(toy, rows: pd.DataFrame, tmp_path: Path) -> None:
    # Masks come from the exported graph, not from the weights alone: a graph re-exported with other numerics must
    # not find the masks of the old one, so the cache folder is named by the graph's SHA-256.
    art = load_artifact(toy.model_dir, "cpu")
    good = rows.drop(index=BAD_ROW).head(3).reset_index(drop=True)
    predict_manifest(art, good, batch_size=4, num_workers=1, mask_dir=tmp_path)
    graph, weights = art.segmenter.cache_key, art.segmenter_key
    assert graph != weights
    assert [p.name for p in tmp_path.iterdir()] == [graph[:16]]


def test_pipelined_loop_reports_an_unreadable_file_mid_batch(toy, rows: pd.DataFrame) -> None:
    table, _ = _run(toy, rows, pipeline=True, on_error="report")
    assert table["image"].tolist() == rows["image"].tolist()
    assert table.loc[BAD_ROW, "status"] == "error" and np.isnan(table.loc[BAD_ROW, "prob"])
    reason = table.loc[BAD_ROW, "no_result_reason"]
    assert reason.startswith("error: ") and "broken.png" in reason
    others = table.drop(index=BAD_ROW)
    assert others["status"].isin(["ok", "no_result"]).all() and others["prob"].notna().all()
    (unreadable,) = table.attrs["unreadable"]
    assert unreadable["row"] == BAD_ROW and unreadable["image"] == rows["image"][BAD_ROW]
    skipped, _ = _run(toy, rows, pipeline=True, on_error="skip")
    assert len(skipped) == len(rows) - 1 and "broken.png" not in " ".join(skipped["image"])


@pytest.mark.parametrize("pipeline", [False, True])
def test_unreadable_file_mid_batch_raises_naming_file_and_row(toy, rows: pd.DataFrame, pipeline: bool) -> None:
    with pytest.raises(ImageError, match=rf"broken\.png.*manifest row {BAD_ROW}"):
        _run(toy, rows, pipeline=pipeline, on_error="raise")


def test_pipelined_keeps_order_and_overlaps() -> None:
    running, peak, lock = [0], [0], threading.Lock()

    def slow(tag: str):
        def fn(x: list[str]) -> list[str]:
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.01)
            with lock:
                running[0] -= 1
            return [*x, tag]
        fn.__name__ = tag
        return fn

    got = list(pipelined(([str(i)] for i in range(12)), [slow("a"), slow("b"), slow("c")]))
    assert got == [[str(i), "a", "b", "c"] for i in range(12)]
    assert peak[0] >= 2  # stages ran at the same time


def test_pipelined_raises_a_stage_error_at_its_item_and_stops() -> None:
    seen: list[int] = []

    def stage(x: int) -> int:
        if x == 3:
            raise ValueError(f"item {x} is bad")
        return x

    before = threading.active_count()
    results = pipelined(range(100), [stage, lambda x: x * 10])
    with pytest.raises(ValueError, match="item 3 is bad"):
        for r in results:
            seen.append(r)  # noqa: PERF402 - the items before the failing one
    assert seen == [0, 10, 20]
    time.sleep(0.3)
    assert threading.active_count() <= before  # no stage thread left behind


def test_pipelined_closed_early_stops_its_threads() -> None:
    before = threading.active_count()
    gen = pipelined(range(1000), [lambda x: x + 1])
    assert next(gen) == 1
    gen.close()
    assert threading.active_count() <= before
    with pytest.raises(ConfigError, match="in_flight=0"):
        list(pipelined([1], [lambda x: x], in_flight=0))


@pytest.mark.parametrize("in_flight", [1, 2, 4])
def test_pipelined_bounds_the_items_alive(in_flight: int) -> None:
    started, consumed, worst = [0], [0], [0]

    def first(x: int) -> int:
        started[0] += 1
        worst[0] = max(worst[0], started[0] - consumed[0])
        return x

    for _ in pipelined(range(30), [first, lambda x: x, lambda x: x], in_flight=in_flight):
        time.sleep(0.002)
        consumed[0] += 1
    assert started[0] == 30 and worst[0] <= in_flight
