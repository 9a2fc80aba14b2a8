"""Tests of the similar-case index (covidcxr.index) on tiny seeded synthetic embeddings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import covidcxr.retrieval.index as index_mod
import covidcxr.retrieval.storage as storage_mod
from covidcxr.errors import CaseIndexError, ConfigError, IndexMismatchError, NotFittedError
from covidcxr.retrieval.index import CaseIndex, Match
from covidcxr.retrieval.metrics import knn_vote_scores, retrieval_metrics


def clustered(n: int, dim: int, seed: int = 0, n_clusters: int = 8, spread: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim))
    x = centers[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, dim))
    return x.astype(np.float32)


def make_meta(n: int, start: int = 0, per_patient: int = 3) -> pd.DataFrame:
    ids = np.arange(start, start + n)
    return pd.DataFrame({
        "case_id": [f"c{i}" for i in ids],
        "patient_id": [f"p{i // per_patient}" for i in ids],
        "label": ["covid" if i % 2 else "non_covid" for i in ids],
        "source": ["siteA" if i % 3 else "siteB" for i in ids],
        "view": "PA",
        "image": [f"/data/img{i}.png" for i in ids],
        "thumbnail": [f"/data/thumb{i}.png" for i in ids],
        "study_date": [pd.Timestamp("2020-03-01") + pd.Timedelta(days=int(i)) if i % 4 else pd.NaT for i in ids],
        "age": [float(i % 90) if i % 5 else np.nan for i in ids],
    })


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ids(matches: list[list[Match]]) -> list[list[str]]:
    return [[m.case_id for m in ms] for ms in matches]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, pd.DataFrame]:
    return clustered(240, 24), make_meta(240)


# ---------------------------------------------------------------------- correctness


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_search_agrees_with_numpy_brute_force(data, metric):
    x, meta = data
    q = clustered(7, 24, seed=1)
    idx = CaseIndex(kind="exact", metric=metric).fit(x, meta)
    scores, rows = idx.kneighbors(q, n_neighbors=10)
    if metric == "ip":
        sim = unit(q) @ unit(x).T
    else:
        sim = -((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    want = np.argsort(-sim, axis=1)[:, :10]
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(scores, np.take_along_axis(sim, want, 1), rtol=1e-4, atol=1e-4)
    matches = idx.search(q, k=10)
    assert ids(matches) == [[f"c{r}" for r in row] for row in want]
    assert [m.rank for m in matches[0]] == list(range(1, 11))


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
@pytest.mark.parametrize("pca_dim", [None, 12])
def test_case_finds_itself_first(data, kind, pca_dim):
    x, meta = data
    idx = CaseIndex(kind=kind, pca_dim=pca_dim, nprobe=64).fit(x, meta)
    assert idx.kind_ == kind and idx.index_dim_ == (pca_dim or 24)
    matches = idx.search(x[:20], k=3)
    assert [ms[0].case_id for ms in matches] == list(meta.case_id[:20])
    assert all(ms[0].score == pytest.approx(1.0, abs=1e-4) for ms in matches)


def test_match_carries_metadata(data):
    x, meta = data
    m = CaseIndex().fit(x, meta).search(x[7:8], k=1)[0][0]
    assert (m.case_id, m.patient_id, m.label) == ("c7", "p2", "covid")
    assert m.metadata == {"source": "siteA", "view": "PA", "image": "/data/img7.png", "thumbnail": "/data/thumb7.png",
                          "study_date": "2020-03-08T00:00:00", "age": 7.0}
    m0 = CaseIndex().fit(x, meta).search(x[0:1], k=1)[0][0]
    assert m0.metadata["study_date"] is None and m0.metadata["age"] is None  # NaT / NaN come back as None
    assert json.loads(json.dumps(m.to_dict()))["case_id"] == "c7"


def test_integer_labels_and_list_of_dicts_metadata():
    x = clustered(10, 4)
    records = [{"case_id": i, "patient_id": i // 2, "label": i % 2} for i in range(10)]
    idx = CaseIndex().fit(x, records)
    m = idx.search(x[3:4], k=1)[0][0]
    assert (m.case_id, m.patient_id, m.label, m.metadata) == ("3", "1", "covid", {})


# ---------------------------------------------------------------------- patient exclusion


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_patient_exclusion_keeps_k_results(data, kind):
    x, meta = data
    idx = CaseIndex(kind=kind).fit(x, meta)
    q = x[:6]
    own = list(meta.patient_id[:6])
    res = idx.search(q, k=10, exclude_patients=own)
    for ms, p in zip(res, own, strict=True):
        assert len(ms) == 10 and p not in {m.patient_id for m in ms}
        assert [m.rank for m in ms] == list(range(1, 11))
    if kind == "exact":
        # Same as the unfiltered ranking with the patient's cases dropped.
        full = idx.search(q, k=len(x))
        assert ids(res) == [[m.case_id for m in ms if m.patient_id != p][:10] for ms, p in zip(full, own, strict=True)]


def test_patient_exclusion_forms(data):
    x, meta = data
    idx = CaseIndex(kind="exact").fit(x, meta)
    single = idx.search(x[:2], k=5, exclude_patients="p0")
    assert all("p0" not in {m.patient_id for m in ms} for ms in single)
    per_query = idx.search(x[:2], k=5, exclude_patients=[None, {"p0", "p1"}])
    assert per_query[0] == idx.search(x[:1], k=5)[0]
    assert {"p0", "p1"}.isdisjoint(m.patient_id for m in per_query[1])
    # Excluding everyone but one patient leaves that patient's 3 cases, fewer than k.
    everyone_else = sorted(set(meta.patient_id) - {"p5"})
    left = idx.search(x[:1], k=10, exclude_patients=[everyone_else])
    assert sorted(m.case_id for m in left[0]) == ["c15", "c16", "c17"]


# ---------------------------------------------------------------------- approximate indexes


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_recall_is_sane(kind):
    x = clustered(3000, 32, seed=3, n_clusters=30, spread=0.5)
    meta = make_meta(len(x))
    q = clustered(100, 32, seed=4, n_clusters=30, spread=0.5)
    exact = CaseIndex(kind="exact").fit(x, meta).kneighbors(q, 10)[1]
    approx = CaseIndex(kind=kind).fit(x, meta).kneighbors(q, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9


def test_auto_kind_switches_to_hnsw_by_size_and_on_add(data):
    x, meta = data
    assert CaseIndex(kind="auto").fit(x, meta).kind_ == "exact"
    assert CaseIndex(kind="auto", approx_threshold=100).fit(x, meta).kind_ == "hnsw"
    idx = CaseIndex(kind="auto", approx_threshold=200).fit(x[:150], meta[:150])
    assert idx.kind_ == "exact"
    idx.add(x[150:], meta[150:])
    assert idx.kind_ == "hnsw" and len(idx) == 240
    assert [ms[0].case_id for ms in idx.search(x[140:160], k=1)] == list(meta.case_id[140:160])


def test_set_params_tunes_a_fitted_index(data):
    x, meta = data
    idx = CaseIndex(kind="ivf", nprobe=1).fit(x, meta)
    ivf = index_mod._import_faiss().extract_index_ivf(idx.index_)
    assert ivf.nprobe == 1
    assert idx.set_params(nprobe=ivf.nlist) is idx and ivf.nprobe == ivf.nlist
    exact = CaseIndex(kind="exact").fit(x, meta)
    assert idx.search(x[:5], k=5) == exact.search(x[:5], k=5)  # probing every list is exact
    with pytest.raises(ConfigError, match=r"unknown CaseIndex setting\(s\) \['efsearch'\]"):
        idx.set_params(efsearch=3)
    with pytest.raises(ConfigError, match="nprobe must be an integer >= 1, got 0"):
        idx.set_params(nprobe=0)
    assert idx.nprobe == ivf.nlist  # a refused change leaves the settings as they were


def test_add_extends_search(data):
    x, meta = data
    idx = CaseIndex(kind="exact").fit(x[:200], meta[:200]).add(x[200:], meta[200:])
    full = CaseIndex(kind="exact").fit(x, meta)
    assert idx.search(x[::17], k=8) == full.search(x[::17], k=8)


# ---------------------------------------------------------------------- persistence


@pytest.mark.parametrize("params", [
    {"kind": "exact"},
    {"kind": "hnsw", "ef_search": 20},
    {"kind": "ivf", "nprobe": 3},
    {"kind": "exact", "pca_dim": 8, "whiten": True},
    {"kind": "exact", "metric": "l2", "pca_dim": 8},
])
def test_save_load_round_trip(tmp_path, data, params):
    x, meta = data
    idx = CaseIndex(model_hash="sha256:aa", **params).fit(x, meta)
    q = clustered(9, 24, seed=7)
    before = idx.search(q, k=7, exclude_patients="p3")
    path = idx.save(tmp_path / "idx")
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["header.json", "index.faiss", "metadata.sqlite"] + (["pca.faiss"] if "pca_dim" in params else []))
    header = json.loads((path / "header.json").read_text())
    assert header["count"] == 240 and header["dim"] == 24 and header["model_hash"] == "sha256:aa"
    assert header["kind"] == params["kind"] and header["format_version"] == index_mod.FORMAT_VERSION
    loaded = CaseIndex.load(path, expect_model_hash="sha256:aa", expect_dim=24)
    assert loaded.get_params() == idx.get_params()
    assert loaded.search(q, k=7, exclude_patients="p3") == before
    pd.testing.assert_frame_equal(loaded.metadata_, idx.metadata_)


def test_load_refuses_mismatches(tmp_path, data):
    x, meta = data
    path = CaseIndex(model_hash="hash-A").fit(x, meta).save(tmp_path / "idx")
    with pytest.raises(IndexMismatchError, match="'hash-A'.*'hash-B'"):
        CaseIndex.load(path, expect_model_hash="hash-B")
    with pytest.raises(IndexMismatchError, match="24-d.*2048-d"):
        CaseIndex.load(path, expect_dim=2048)
    loaded = CaseIndex.load(path)
    with pytest.raises(ConfigError, match="dimension 16 but the index expects 24"):
        loaded.search(np.ones((1, 16), np.float32), k=3)
    header = json.loads((path / "header.json").read_text())
    (path / "header.json").write_text(json.dumps({**header, "format_version": 99}))
    with pytest.raises(IndexMismatchError, match="format version is 99.*reads version 1"):
        CaseIndex.load(path)
    (path / "header.json").write_text(json.dumps({**header, "index_dim": 12}))
    with pytest.raises(IndexMismatchError, match="dimension 24 but the header says 12"):
        CaseIndex.load(path)
    (path / "header.json").write_text(json.dumps({**header, "count": 5}))
    with pytest.raises(CaseIndexError, match="inconsistent counts"):
        CaseIndex.load(path)
    with pytest.raises(CaseIndexError, match="no such index directory"):
        CaseIndex.load(tmp_path / "nope")


def test_crash_mid_add_keeps_old_index(tmp_path, data, monkeypatch):
    x, meta = data
    path = CaseIndex(kind="exact").fit(x[:200], meta[:200]).save(tmp_path / "idx")
    q = x[::13]
    before = CaseIndex.load(path).search(q, k=5)

    def crash(p: Path, frame: pd.DataFrame) -> None:
        p.write_bytes(b"half a table")
        raise OSError("disk full")

    monkeypatch.setattr(index_mod, "_write_metadata", crash)
    with pytest.raises(OSError, match="disk full"):
        CaseIndex.load(path).add(x[200:], meta[200:]).save(path)
    monkeypatch.undo()
    old = CaseIndex.load(path)
    assert len(old) == 200 and old.search(q, k=5) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # the half-written temp dir is gone
    CaseIndex.load(path).add(x[200:], meta[200:]).save(path)
    assert len(CaseIndex.load(path)) == 240


def test_crash_between_renames_recovers_previous_index(tmp_path, data, monkeypatch):
    x, meta = data
    path = CaseIndex(kind="exact").fit(x[:200], meta[:200]).save(tmp_path / "idx")
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # old index moved aside, new one not yet in place
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)  # the os module that storage.py renames with
    with pytest.raises(KeyboardInterrupt):
        CaseIndex.load(path).add(x[200:], meta[200:]).save(path)
    monkeypatch.undo()
    assert not path.exists()
    assert len(CaseIndex.load(path)) == 200  # loads the kept previous index
    CaseIndex.load(path).add(x[200:], meta[200:]).save(path)
    assert len(CaseIndex.load(path)) == 240
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_save_refuses_to_replace_a_foreign_directory(tmp_path, data):
    x, meta = data
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"x")
    with pytest.raises(CaseIndexError, match="not a case index"):
        CaseIndex().fit(x, meta).save(tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.png").exists()


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def _leftovers(parent: Path, dead: int, live: int) -> tuple[set[str], set[str]]:
    """Fake leftovers of killed saves of ``idx`` (stale) and look-alikes that must survive (kept)."""
    old = os.path.getmtime(parent / "idx") - 3600
    stale = {f".idx.tmp-{dead}-ab12cd_3", f".idx.tmp-{dead}-zzzzzzzz", ".idx.tmp-legacy_1"}
    kept = {
        f".idx.tmp-{live}-livesave",  # a save in flight in another, running process
        f".idx.tmp-{os.getpid()}-ownthrd1",  # this process's own (another thread's save)
        ".idx.tmp-freshleg",  # no pid, recent: may be an older covidcxr's save in flight
        f".other.tmp-{dead}-ab12cd_3", f".idx2.tmp-{dead}-ab12cd_3", ".other.old",  # other indexes' leftovers
        f"idx.tmp-{dead}-ab12cd_3", f".idx.tmp-{dead}-toolongname", ".idx.older", "photos",  # not our pattern
    }
    for name in stale | kept:
        (parent / name).mkdir()
        (parent / name / "header.json").write_text("{}")
    os.utime(parent / ".idx.tmp-legacy_1", (old, old))
    (parent / f".idx.tmp-{dead}-filefile").write_text("a file, not a save directory")
    kept.add(f".idx.tmp-{dead}-filefile")
    return stale, kept


@pytest.mark.parametrize("when", ["load", "save"])
def test_stale_save_leftovers_are_removed(tmp_path, data, when, caplog):
    x, meta = data
    path = CaseIndex(kind="exact").fit(x[:50], meta[:50]).save(tmp_path / "idx")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale, kept = _leftovers(tmp_path, _dead_pid(), live.pid)
        # a previous index kept by a save that died after its swap: stale while idx itself is complete
        (tmp_path / ".idx.old").mkdir()
        stale.add(".idx.old")
        with caplog.at_level("INFO", logger="covidcxr.retrieval.storage"):
            if when == "load":
                assert len(CaseIndex.load(path)) == 50
            else:
                CaseIndex(kind="exact").fit(x, meta).save(path)
    finally:
        live.kill()
        live.wait()
    names = {p.name for p in tmp_path.iterdir()}
    assert names == kept | {"idx"}
    assert f"removed {len(stale)} stale" in caplog.text
    assert len(CaseIndex.load(path)) == (50 if when == "load" else 240)


def test_backup_is_kept_while_it_is_the_only_index(tmp_path, data):
    x, meta = data
    path = CaseIndex(kind="exact").fit(x[:50], meta[:50]).save(tmp_path / "idx")
    os.replace(path, tmp_path / ".idx.old")  # a save died between its two renames
    (tmp_path / f".idx.tmp-{_dead_pid()}-ab12cd_3").mkdir()
    assert len(CaseIndex.load(path)) == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.old"]
    CaseIndex(kind="exact").fit(x, meta).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    assert len(CaseIndex.load(path)) == 240


def test_save_names_its_temporary_directory_after_the_process(tmp_path, data, monkeypatch):
    x, meta = data
    seen = []
    real_swap = storage_mod._swap_in

    def spy(tmp: Path, directory: Path) -> None:
        seen.append(tmp.name)
        real_swap(tmp, directory)

    monkeypatch.setattr(storage_mod, "_swap_in", spy)  # the swap of storage.staged_index
    CaseIndex(kind="exact").fit(x[:50], meta[:50]).save(tmp_path / "idx")
    assert len(seen) == 1 and seen[0].startswith(f".idx.tmp-{os.getpid()}-")


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("call", [
    lambda i: i.search(np.ones((1, 4), np.float32), 3),
    lambda i: i.kneighbors(np.ones((1, 4), np.float32), 3),
    lambda i: i.add(np.ones((1, 4), np.float32), [{"case_id": "a", "patient_id": "p", "label": "covid"}]),
    lambda i: i.save("unused"),
    lambda i: i.n_cases_,
])
def test_unfitted_index_raises(call):
    with pytest.raises(NotFittedError, match="not fitted"):
        call(CaseIndex())
    assert len(CaseIndex()) == 0


def _meta(n: int) -> pd.DataFrame:
    return make_meta(n)[["case_id", "patient_id", "label"]]


@pytest.mark.parametrize("embeddings,metadata,params,match", [
    (np.full((3, 4), np.nan), _meta(3), {}, r"3 row\(s\) contain NaN/inf.*rows \[0, 1, 2\]"),
    (np.array([[1e39, 0, 0, 0], [1, 0, 0, 0]]), _meta(2), {}, r"overflow float32, e.g. rows \[0\]"),
    (np.ones(4), _meta(1), {}, r"2-D array.*shape \(4,\).*reshape\(1, -1\)"),
    (np.array([["a", "b"]]), _meta(1), {}, "real-valued numeric array"),
    (np.ones((0, 4)), _meta(0), {}, "empty"),
    (np.zeros((2, 4)), _meta(2), {}, r"row\(s\) \[0, 1\] have zero norm"),
    (np.ones((3, 4)), _meta(2), {}, r"metadata has 2 row\(s\) but there are 3 embedding"),
    (np.ones((2, 4)), _meta(2).drop(columns="label"), {}, r"lacks required column\(s\) \['label'\]"),
    (np.ones((2, 4)), _meta(2).assign(case_id=["x", "x"]), {}, r"1 duplicate case_id\(s\): 'x'"),
    (np.ones((2, 4)), _meta(2).assign(patient_id=[None, "p"]), {}, r"'patient_id' is empty in 1 row\(s\)"),
    (np.ones((2, 4)), "cases.csv", {}, "DataFrame or a list of dicts, got str"),
    (np.ones((2, 4)), _meta(2).assign(extra=[[1], [2]]), {}, "cannot be stored"),
    (np.ones((2, 4)), _meta(2), {"kind": "annoy"}, "kind='annoy' is not one of"),
    (np.ones((2, 4)), _meta(2), {"metric": "cosine"}, "metric='cosine' is not one of"),
    (np.ones((2, 4)), _meta(2), {"pca_dim": 3}, r"pca_dim=3 must be <= min\(n_cases, dim\) = min\(2, 4\)"),
    (np.ones((2, 4)), _meta(2), {"whiten": True}, "whiten=True requires pca_dim"),
    (np.ones((2, 4)), _meta(2), {"hnsw_m": 0}, "hnsw_m must be an integer >= 2"),
])
def test_bad_fit_input_messages(embeddings, metadata, params, match):
    with pytest.raises(ConfigError, match=match):
        CaseIndex(**params).fit(embeddings, metadata)


def test_bad_search_and_add_input_messages(data):
    x, meta = data
    idx = CaseIndex().fit(x, meta)
    with pytest.raises(ConfigError, match="k must be an integer >= 1, got 0"):
        idx.search(x[:1], k=0)
    with pytest.raises(ConfigError, match="exclude_patients has 3 entries but there are 2 queries"):
        idx.search(x[:2], k=3, exclude_patients=["p1", "p2", "p3"])
    with pytest.raises(ConfigError, match="query_embeddings.*NaN"):
        idx.search(np.full((1, 24), np.nan), k=3)
    with pytest.raises(ConfigError, match=r"2 case_id\(s\) already in the index: 'c1', 'c3'"):
        idx.add(x[:3], meta.iloc[[1, 3]].pipe(lambda m: pd.concat([m, make_meta(1, start=999)])))
    assert len(idx) == 240  # the failed add changed nothing


def test_index_module_does_not_import_torch():
    code = "import sys, covidcxr.retrieval.index; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------- vote scores and retrieval metrics


def _m(label: str, score: float, rank: int = 1) -> Match:
    return Match(rank=rank, score=score, case_id=f"c{rank}", patient_id="p", label=label)


def test_knn_vote_scores():
    matches = [
        [_m("covid", 0.9), _m("non_covid", 0.3), _m("covid", 0.6)],
        [_m("non_covid", -0.2), _m("covid", -0.5)],  # all weights clip to 0: plain share
        [],
    ]
    got = knn_vote_scores(matches)
    np.testing.assert_allclose(got[:2], [1.5 / 1.8, 0.5])
    assert np.isnan(got[2])


def test_retrieval_metrics():
    matches = [
        [_m("covid", 0.9, 1), _m("non_covid", 0.8, 2), _m("covid", 0.7, 3)],
        [_m("covid", 0.9, 1), _m("covid", 0.8, 2), _m("covid", 0.7, 3)],
    ]
    got = retrieval_metrics(["covid", 0], matches, ks=(1, 3))
    assert got["precision@1"] == pytest.approx(0.5)
    assert got["precision@3"] == pytest.approx((2 / 3 + 0) / 2)
    assert got["map@10"] == pytest.approx(((1 + 2 / 3) / 2 + 0) / 2)
    assert got["n_queries"] == 2
    with pytest.raises(ConfigError, match="query_labels has 1 entries but matches has 2"):
        retrieval_metrics(["covid"], matches)
