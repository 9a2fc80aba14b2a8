"""The input gate: no verdict on what is not a usable frontal chest X-ray (covidcxr.classification.ood)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest

from covidcxr.classification.ood import BLOCKING_QC_FLAGS, OODReference, fit_reference, gate
from covidcxr.errors import ConfigError
from covidcxr.io.files import save_png

SAMPLE = Path(matplotlib.get_data_path()) / "sample_data"


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_threshold_is_the_validation_quantile_and_far_points_fail() -> None:
    rng = np.random.default_rng(0)
    centre = rng.normal(size=16)
    train = _unit(centre + 0.3 * rng.normal(size=(200, 16)))
    val = _unit(centre + 0.3 * rng.normal(size=(100, 16)))
    ref, d_val = fit_reference(train, val, quantile=0.9, k=5)
    assert np.isclose(ref.threshold, np.quantile(d_val, 0.9))
    assert (d_val > ref.threshold).mean() == pytest.approx(0.1, abs=0.02)
    far = _unit(-centre[None] + 0.3 * rng.normal(size=(5, 16)))
    assert (ref.distances(far) > ref.threshold).all()
    assert np.allclose(ref.distances(train[:3]), ref.distances(train[:3]))
    with pytest.raises(ConfigError, match="do not fit a 16-d reference"):
        ref.distances(np.zeros((1, 8), np.float32))


def test_distances_do_not_depend_on_the_batch() -> None:
    # The gate compares a distance with a threshold: an image's distance must not move with the images batched
    # beside it (float32 BLAS blocks by batch size and sums in another order: 1e-7 apart).
    rng = np.random.default_rng(3)
    ref = OODReference(_unit(rng.normal(size=(1306, 1280))), threshold=0.2)
    q = _unit(rng.normal(size=(45, 1280)))
    whole = ref.distances(q)
    exact = 1.0 - np.sort(q.astype(np.float64) @ ref.embeddings.astype(np.float64).T, axis=1)[:, ::-1][:, :5].mean(1)
    np.testing.assert_allclose(whole, exact, rtol=0, atol=1e-13)
    for size in (1, 7, 32):
        parts = np.concatenate([ref.distances(q[s : s + size]) for s in range(0, len(q), size)])
        np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-13)


def test_reference_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ref = OODReference(_unit(rng.normal(size=(20, 8))), 0.3, k=3)
    entry = ref.save(tmp_path)
    again = OODReference.load(tmp_path, entry)
    assert again.threshold == 0.3 and again.k == 3
    np.testing.assert_allclose(again.embeddings, ref.embeddings, atol=1e-3)  # float16 on disk


@pytest.mark.parametrize("flag", BLOCKING_QC_FLAGS)
def test_blocking_qc_flags_withhold_the_result(flag: str) -> None:
    result = gate([flag])
    assert not result.usable and result.reasons == [flag]
    assert result.message.startswith("no result: not a usable frontal chest X-ray, because")
    assert gate(["asymmetric"]).usable  # a warning, not a reason to withhold


def test_distance_above_threshold_withholds_the_result() -> None:
    assert gate([], 0.6, 0.5).reasons == ["out_of_distribution"]
    assert gate([], 0.4, 0.5).usable


@pytest.mark.parametrize("picture", ["grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"])
def test_shipped_model_gives_no_result_on_photographs(picture: str) -> None:
    from covidcxr.classification.artifact import load_artifact, shipped_model_dir
    from covidcxr.service import jobs

    assert load_artifact(shipped_model_dir(), "cpu").ood_reference is not None
    out = jobs.predict_files([SAMPLE / picture], shipped_model_dir(), device="cpu")
    row = out.table.iloc[0]
    assert row["status"] == "no_result" and np.isnan(row["prob_covid"]) and row["label"] == ""
    assert "not a usable frontal chest X-ray" in row["no_result_reason"]


def test_shipped_model_gives_a_result_on_real_cxrs() -> None:
    from covidcxr.classification.artifact import shipped_model_dir
    from covidcxr.demo import SAMPLES, SAMPLES_DIR
    from covidcxr.service import jobs

    out = jobs.predict_files([SAMPLES_DIR / n for n in sorted(SAMPLES)], shipped_model_dir(), device="cpu")
    assert (out.table["status"] == "ok").all(), out.table
    assert out.table["prob_covid"].between(0, 1).all()


@pytest.mark.parametrize("kind", ["blank", "noise"])
def test_cli_predict_a_refusal_is_an_answer(kind: str, tmp_path: Path, capsys) -> None:
    # Exit status (README): 0 every input answered, a reasoned "no result" included; 1 only for unreadable inputs.
    from covidcxr.cli import main
    from covidcxr.demo import SAMPLES, SAMPLES_DIR

    rng = np.random.default_rng(0)
    bad = save_png(tmp_path / f"{kind}.png", np.zeros((256, 256), np.float32) if kind == "blank"
                   else rng.random((256, 256), dtype=np.float32))
    assert main(["predict", str(bad), "--device", "cpu", "--out", str(tmp_path / "p.csv")]) == 0
    assert "no result" in capsys.readouterr().out
    good = SAMPLES_DIR / min(SAMPLES)
    assert main(["predict", str(bad), str(good), "--device", "cpu", "--out", str(tmp_path / "q.csv")]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "q.csv")
    assert table["status"].tolist() == ["no_result", "ok"]


def test_self_distances_leave_each_embedding_out() -> None:
    rng = np.random.default_rng(2)
    ref = OODReference(_unit(rng.normal(size=(30, 8))), 0.5, k=3)
    loo = ref.self_distances()
    assert (loo > ref.distances(ref.embeddings)).all()  # an embedding is not its own neighbour
    sim = ref.embeddings[1:] @ ref.embeddings[0]
    assert np.isclose(loo[0], 1.0 - np.sort(sim)[-3:].mean())
