"""Embeddings from a model artifact, index build/add with thumbnails, contact sheets, retrieval evaluation, demo."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.classification.artifact import load_artifact
from covidcxr.data.manifest import both_label_mask, read_manifest
from covidcxr.data.split import patient_split, select_split
from covidcxr.demo import run_index_demo
from covidcxr.errors import ConfigError, ImageReadError, IndexMismatchError
from covidcxr.io.image import load_image
from covidcxr.retrieval.embed import case_metadata, embed_manifest
from covidcxr.retrieval.index import CaseIndex, Match
from covidcxr.retrieval.metrics import evaluate_retrieval
from covidcxr.retrieval.report import contact_sheet, evaluate_model_retrieval
from covidcxr.retrieval.workflow import add_to_index, build_index, search_image

torch.set_num_threads(1)  # 2 threads on 2 shared cores thrash (OpenMP spin-waits)
SIZE = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_tiny_artifact) -> Path:
    return make_tiny_artifact(tmp_path_factory.mktemp("embed") / "model", seed=0)


@pytest.fixture(scope="module")
def art(model_dir: Path):
    return load_artifact(model_dir, "cpu")


@pytest.fixture(scope="module")
def manifest(synth_cohort: Path, tmp_path_factory) -> Path:
    """The synthetic cohort with a patient-level split column."""
    df = patient_split(read_manifest(synth_cohort), val=0.2, test=0.3, seed=0)
    path = tmp_path_factory.mktemp("split") / "manifest.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def df(manifest: Path) -> pd.DataFrame:
    return read_manifest(manifest)


# -- embeddings ------------------------------------------------------------------------------------------------


def test_embeddings_are_unit_norm_deterministic_and_use_stored_preprocessing(art, df: pd.DataFrame) -> None:
    rows = df.head(7)
    emb, kept = embed_manifest(art, rows, batch_size=3, progress=False)
    assert emb.shape == (7, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    again, _ = embed_manifest(art, rows, batch_size=5, progress=False, num_workers=1)
    np.testing.assert_allclose(again, emb, atol=1e-6)
    direct = art.embed([load_image(p)[0] for p in rows["image"]])
    np.testing.assert_allclose(emb, direct, atol=1e-6)
    assert kept["image"].tolist() == rows["image"].tolist()
    assert kept["prob"].between(0, 1).all()


def test_bad_image_is_named_or_skipped(art, df: pd.DataFrame, tmp_path: Path, caplog) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    rows = pd.concat([df.head(3), df.head(1).assign(image=str(bad))], ignore_index=True)
    with pytest.raises(ImageReadError, match=r"broken\.png: .*manifest row 3"):
        embed_manifest(art, rows, progress=False)
    with caplog.at_level(logging.WARNING, logger="covidcxr.classification.loop"):
        emb, kept = embed_manifest(art, rows, progress=False, skip_bad=True)
    assert len(emb) == len(kept) == 3 and str(bad) not in kept["image"].tolist()
    assert "broken.png" in caplog.text


@pytest.mark.parametrize(("rows", "pattern"), [
    (pd.DataFrame({"path": ["a.png"]}), "needs an 'image' column"),
    (pd.DataFrame({"image": []}), "no rows"),
])
def test_embed_rejects_bad_tables(art, rows: pd.DataFrame, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        embed_manifest(art, rows, progress=False)


def test_case_metadata_ids_and_columns(tmp_path: Path) -> None:
    rows = pd.DataFrame({"image": [str(tmp_path / "a" / "x.png"), "/elsewhere/y.png"], "patient_id": ["P1", "P2"],
                         "label": ["covid", "non_covid"], "source": ["s", "t"], "view": ["PA", "AP"],
                         "finding": ["x", "y"]})
    meta = case_metadata(rows, root=tmp_path)
    assert meta["case_id"].tolist() == ["a/x.png", "/elsewhere/y.png"]
    assert {"source", "view", "image"} <= set(meta.columns) and "finding" not in meta.columns
    meta = case_metadata(rows.assign(case_id=["c1", "c2"]), root=tmp_path)
    assert meta["case_id"].tolist() == ["c1", "c2"]


def test_select_split_errors(df: pd.DataFrame) -> None:
    assert set(select_split(df, "train")["split"]) == {"train"}
    assert len(select_split(df, "all")) == len(df)
    with pytest.raises(ConfigError, match="no rows with split 'holdout'"):
        select_split(df, "holdout")
    with pytest.raises(ConfigError, match="no 'split' column"):
        select_split(df.drop(columns="split"), "train")


# -- build, add, search ------------------------------------------------------------------------------------------


def test_build_add_keeps_thumbnails_and_records_model(art, model_dir: Path, df: pd.DataFrame, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "index"
    train, test = select_split(df, "train"), select_split(df, "test")
    index = build_index(art, train, out, thumbnails=True, progress=False)
    assert len(index) == len(train)
    header = json.loads((out / "header.json").read_text())
    assert header["model_hash"] == art.weights_hash
    assert header["build_info"]["model_dir"] == str(model_dir.resolve())
    thumbs = index.metadata_["thumbnail"].tolist()
    assert all((out / t).is_file() for t in thumbs)
    assert max(Image.open(out / thumbs[0]).size) == 128
    with pytest.raises(ConfigError, match="already exists"):
        build_index(art, train, out, progress=False)

    index, n = add_to_index(out, art, test, progress=False)
    assert n == len(test) and len(index) == len(train) + len(test)
    loaded = CaseIndex.load(out)
    assert all((out / t).is_file() for t in loaded.metadata_["thumbnail"])  # old and new thumbnails survive the save
    assert len(loaded.build_info["additions"]) == 1
    with pytest.raises(ConfigError, match="already in the index"):
        add_to_index(out, art, test.head(2), progress=False)
    assert add_to_index(out, art, test.head(2), progress=False, skip_existing=True)[1] == 0


def test_add_refuses_another_model(art, df: pd.DataFrame, tmp_path: Path, make_tiny_artifact) -> None:
    out = tmp_path / "index"
    build_index(art, select_split(df, "train").head(6), out, progress=False)
    other = load_artifact(make_tiny_artifact(tmp_path / "other", seed=1), "cpu")
    with pytest.raises(IndexMismatchError, match="embedding model hash"):
        add_to_index(out, other, select_split(df, "test").head(2), progress=False)


def test_pca_dim_checked_before_embedding(art, df: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pca_dim=100 must be <="):
        build_index(art, df.head(5), tmp_path / "i", pca_dim=100, progress=False)
    index = build_index(art, df.head(12), tmp_path / "j", pca_dim=4, progress=False)
    assert index.index_dim_ == 4 and CaseIndex.load(tmp_path / "j").pca_ is not None


def test_search_image_excludes_patient(art, df: pd.DataFrame, tmp_path: Path) -> None:
    train = select_split(df, "train")
    index = build_index(art, train, tmp_path / "index", progress=False)
    query = train.iloc[0]
    image = load_image(query["image"])[0]
    matches, prob = search_image(art, index, image, k=3)
    assert matches[0].metadata["image"] == query["image"] and matches[0].score == pytest.approx(1.0, abs=1e-4)
    assert 0 <= prob <= 1
    matches, _ = search_image(art, index, image, k=3, exclude_patients=query["patient_id"])
    assert len(matches) == 3 and query["patient_id"] not in {m.patient_id for m in matches}


def test_contact_sheet_written(tmp_path: Path) -> None:
    from PIL import Image

    from covidcxr.io.files import save_png

    img = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(40, 30)
    save_png(tmp_path / "case.png", img)
    matches = [Match(1, 0.9, "c1", "P1", "covid", {"image": str(tmp_path / "case.png")}),
               Match(2, 0.8, "c2", "P2", "non_covid", {"thumbnail": "missing.png"})]
    out = contact_sheet(img, matches, tmp_path / "sheets" / "sheet.png", index_dir=tmp_path, ncols=2)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (2 * 230, 2 * 270)  # query + 2 matches at ncols=2: 2 x 2 tiles
        assert np.asarray(im.convert("L")).std() > 0


# -- retrieval quality ------------------------------------------------------------------------------------------


def _clustered(n_per_label: int, seed: int, prefix: str) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    centres = {"covid": np.eye(8)[0], "non_covid": np.eye(8)[1]}
    rows, emb = [], []
    for label, centre in centres.items():
        for i in range(n_per_label):
            emb.append(centre + 0.05 * rng.standard_normal(8))
            rows.append({"case_id": f"{prefix}{label}{i}", "patient_id": f"{prefix}{label}{i // 2}", "label": label,
                         "source": "A" if i % 2 else "B"})
    return np.asarray(emb, np.float32), pd.DataFrame(rows)


def test_evaluate_retrieval_separable_clusters() -> None:
    e_train, m_train = _clustered(20, 0, "tr")
    e_test, m_test = _clustered(6, 1, "te")
    probs = np.where(m_test["label"] == "covid", 0.8, 0.3)
    result = evaluate_retrieval(e_train, m_train, e_test, m_test, test_prob=probs, n_boot=50)
    ov = result["overall"]
    assert ov["precision@1"] == ov["precision@5"] == ov["precision@10"] == ov["map@10"] == 1.0
    assert ov["knn_auc"]["value"] == 1.0 and ov["network_auc"]["value"] == 1.0
    assert ov["chance_precision"] == pytest.approx(0.5)
    assert ov["n_queries"] == 12 and ov["n_patients"] == 6
    assert set(result["per_source"]) == {"A", "B"}
    assert result["both_label_sources"]["sources"] == ["A", "B"]


def test_evaluate_retrieval_leaves_the_query_patient_out() -> None:
    # The query's own patient sits in the index with the identical vector but the opposite label: retrieving it
    # would make precision@1 zero; leave-patient-out must skip it and find the right cluster.
    e_train, m_train = _clustered(10, 0, "tr")
    e_query, m_query = e_train[:1], m_train.iloc[:1]
    twin = m_query.assign(case_id="twin", label="non_covid")
    e_index = np.concatenate([e_train[2:], e_query])
    m_index = pd.concat([m_train.iloc[2:], twin], ignore_index=True)
    plain = CaseIndex().fit(e_index, m_index).search(e_query, k=1)[0][0]
    assert plain.case_id == "twin"  # without leaving the patient out the twin would win
    result = evaluate_retrieval(e_index, m_index, e_query, m_query, n_boot=0)
    assert result["overall"]["precision@1"] == 1.0
    assert result["overall"]["network_auc"] is None


def test_both_label_mask_from_flag_or_data() -> None:
    meta = pd.DataFrame({"source": ["a", "a", "b"], "label": ["covid", "non_covid", "covid"]})
    mask, names = both_label_mask(meta)
    assert mask.tolist() == [True, True, False] and names == ["a"]
    mask, names = both_label_mask(meta.assign(source_has_both_labels=["False", "False", "True"]))
    assert mask.tolist() == [False, False, True] and names == ["b"]


def test_evaluate_model_retrieval_on_tiny_model(art, df: pd.DataFrame) -> None:
    result = evaluate_model_retrieval(art, df, k=5, n_boot=20, progress=False)
    ov = result["overall"]
    assert ov["n_queries"] == int((df["split"] == "test").sum())
    for key in ("precision@1", "precision@5", "map@5", "chance_precision"):
        assert 0.0 <= ov[key] <= 1.0
    assert 0.0 <= ov["knn_auc"]["value"] <= 1.0 and 0.0 <= ov["network_auc"]["value"] <= 1.0
    assert result["model"]["model_hash"] == art.weights_hash
    assert result["per_source"]


def test_run_index_demo(model_dir: Path, manifest: Path, tmp_path: Path) -> None:
    out = run_index_demo(model_dir, manifest, tmp_path / "demo", k=4, device="cpu", n_boot=10)
    assert len(out["rows"]) == 4 and [r["rank"] for r in out["rows"]] == [1, 2, 3, 4]
    assert out["query"]["patient_id"] not in {r["patient_id"] for r in out["rows"]}
    assert Path(out["sheet"]).is_file() and (tmp_path / "demo" / "retrieval.json").is_file()
    assert out["retrieval"]["n_queries"] > 0
    json.dumps(out)  # JSON-ready
    again = run_index_demo(model_dir, manifest, tmp_path / "demo", k=4, device="cpu", evaluate=False)
    assert again["rows"] == out["rows"]
