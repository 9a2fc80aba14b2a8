"""Archive-scale index: IVF-PQ with on-disk lists and re-ranking, SQLite metadata, streamed builds, shard files."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest

from covidcxr.errors import CaseIndexError, ConfigError
from covidcxr.retrieval import compressed, shards
from covidcxr.retrieval.archive import build_from_shards, build_streaming
from covidcxr.retrieval.index import CaseIndex
from covidcxr.retrieval.metadata import MetadataWriter, SqliteCases

D = 64
faiss.omp_set_num_threads(1)  # OpenMP over 2 shared cores spin-waits (see CaseIndex's serving note)


def _data(n: int, seed: int = 0, centers: int = 40) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(99).standard_normal((centers, D))
    x = (c[rng.integers(0, centers, n)] + 0.5 * rng.standard_normal((n, D))).astype(np.float32)
    meta = pd.DataFrame({"case_id": [f"s{seed}c{i}" for i in range(n)],
                         "patient_id": [f"s{seed}p{i // 3}" for i in range(n)],
                         "label": np.where(np.arange(n) % 2, "covid", "non_covid"),
                         "source": [f"src{i % 4}" for i in range(n)]})
    return x, meta


def _recall(rows: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(t)) / truth.shape[1] for r, t in zip(rows, truth, strict=True)]))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, pd.DataFrame, np.ndarray, np.ndarray]:
    x, meta = _data(6000)
    q, _ = _data(60, seed=1)
    truth = CaseIndex(kind="exact").fit(x, meta).kneighbors(q, 10)[1]
    return x, meta, q, truth


@pytest.fixture(scope="module")
def fitted(data) -> CaseIndex:
    x, meta, _, _ = data
    return CaseIndex(kind="ivfpq", rerank=10, nprobe=8).fit(x, meta)


def test_reranking_lifts_recall_beyond_pq_order(data, fitted: CaseIndex) -> None:
    x, meta, q, truth = data
    pq_only = CaseIndex(kind="ivfpq", rerank=0, nprobe=8).fit(x, meta)
    reranked = fitted
    r0, r10 = _recall(pq_only.kneighbors(q, 10)[1], truth), _recall(reranked.kneighbors(q, 10)[1], truth)
    assert r10 >= 0.9
    assert r10 > r0 + 0.05
    assert pq_only.vectors_ is None and reranked.vectors_.dtype == np.float16  # no vectors kept when not used


@pytest.mark.parametrize("opq", [False, True])
def test_ivfpq_saved_with_on_disk_lists_and_loaded_from_a_moved_folder(data, tmp_path: Path, opq: bool) -> None:
    x, meta, q, _ = data
    if opq:  # OPQ's rotation training is the slow part: fewer cases
        x, meta = x[:1500], meta.iloc[:1500]
    index = CaseIndex(kind="ivfpq", nprobe=8, opq=opq).fit(x, meta)
    before = index.kneighbors(q, 10)
    index.save(tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"index.faiss", "index.ivfdata", "vectors.npy",
                                                              "metadata.sqlite", "header.json"}
    code = compressed.default_pq_m(D)  # 16 bytes for 64-d
    assert os.path.getsize(tmp_path / "a" / "index.ivfdata") == len(x) * (code + 8)  # exactly sized lists
    os.rename(tmp_path / "a", tmp_path / "moved")
    loaded = CaseIndex.load(tmp_path / "moved")
    after = loaded.kneighbors(q, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6)
    assert isinstance(loaded._cases, SqliteCases) and not loaded.appendable
    assert isinstance(loaded.vectors_, np.memmap)


def test_archive_index_reads_metadata_and_excludes_patients_from_sqlite(data, fitted, tmp_path: Path) -> None:
    x, meta, q, _ = data
    fitted.save(tmp_path / "idx")
    index = CaseIndex.load(tmp_path / "idx")
    first = index.search(q[:3], 5)
    for query, matches in enumerate(first):
        banned = {matches[0].patient_id, matches[1].patient_id}
        again = index.search(q[query:query + 1], 5, exclude_patients=[banned])[0]
        assert len(again) == 5 and not banned & {m.patient_id for m in again}
        row = meta.set_index("case_id").loc[again[0].case_id]
        assert again[0].metadata == {"source": row["source"]} and again[0].label == row["label"]
    assert index.label_counts() == meta["label"].value_counts().to_dict()
    assert index.n_patients_ == meta["patient_id"].nunique()
    assert index.existing_case_ids(["s0c5", "nope"]) == {"s0c5"}
    pd.testing.assert_frame_equal(index.metadata_.astype(str), meta.astype(str))
    with pytest.raises(CaseIndexError, match="cannot grow in place"):
        index.add(x[:2], meta.assign(case_id=["new1", "new2"] + [""] * (len(meta) - 2)).head(2))


def test_auto_kind_moves_to_ivfpq_above_the_archive_threshold(data) -> None:
    x, meta, _, _ = data
    x, meta = x[:1200], meta.iloc[:1200]
    assert CaseIndex(kind="auto", archive_threshold=1000, approx_threshold=500).fit(x, meta).kind_ == "ivfpq"
    assert CaseIndex(kind="auto", archive_threshold=2000, approx_threshold=500).fit(x, meta).kind_ == "hnsw"


@pytest.mark.parametrize(("params", "n", "pattern"), [
    ({"pq_m": 7}, 1000, "pq_m=7 must divide the indexed dimension 64"),
    ({}, 100, "at least 2\\*\\*pq_bits = 256 cases"),
    ({"pq_bits": 17}, 1000, "pq_bits must be <= 16"),
    ({"rerank": -1}, 1000, "rerank must be an integer >= 0"),
    ({"opq": "yes"}, 1000, "opq must be True or False"),
])
def test_ivfpq_settings_are_checked(params: dict, n: int, pattern: str) -> None:
    x, meta = _data(n)
    with pytest.raises(ConfigError, match=pattern):
        CaseIndex(kind="ivfpq", **params).fit(x, meta)


def test_faiss_native_messages_stay_off_stdout(fitted, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    fitted.save(tmp_path / "idx")
    CaseIndex.load(tmp_path / "idx")
    out, err = capfd.readouterr()
    assert out == ""
    assert "resizing" in err  # faiss did print: to stderr, where it cannot corrupt `search --json`


def test_streamed_build_equals_the_in_memory_fit(data, fitted, tmp_path: Path) -> None:
    x, meta, q, _ = data
    mem = fitted
    nlist = int(faiss.extract_index_ivf(mem.index_).nlist)
    # Same training rows as fit() draws: the quantisers, codes and results must then be identical.
    sample = x[compressed.train_sample(len(x), nlist, 0)]
    chunks = ((x[i:i + 1000], meta.iloc[i:i + 1000]) for i in range(0, len(x), 1000))
    streamed = build_streaming(CaseIndex(kind="ivfpq", nprobe=8), chunks, len(x), sample, tmp_path / "s")
    np.testing.assert_array_equal(streamed.kneighbors(q, 10)[1], mem.kneighbors(q, 10)[1])
    assert [m.case_id for m in streamed.search(q[:1], 3)[0]] == [m.case_id for m in mem.search(q[:1], 3)[0]]
    assert not (tmp_path / "s" / "building.ivfdata").exists()


@pytest.mark.parametrize("problem", ["too_few", "too_many", "duplicate_id", "not_an_index"])
def test_streamed_build_refuses_bad_input_and_leaves_nothing(data, tmp_path: Path, problem: str) -> None:
    x, meta, _, _ = data
    x, meta = x[:2000], meta.iloc[:2000]
    chunks = [(x[:1000], meta.iloc[:1000]), (x[1000:], meta.iloc[1000:])]
    n_total, target = 2000, tmp_path / "idx"
    err, pattern = ConfigError, ""
    if problem == "too_few":
        n_total, pattern = 2500, "held 2000 cases but n_total=2500"
    elif problem == "too_many":
        n_total, pattern = 1500, "more than n_total=1500"
    elif problem == "duplicate_id":
        chunks[1] = (x[1000:], meta.iloc[1000:].assign(case_id=meta["case_id"].iloc[:1000].to_numpy()))
        err, pattern = CaseIndexError, "duplicate case_id"
    else:
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        err, pattern = CaseIndexError, "is not a case index"
    with pytest.raises(err, match=pattern):
        build_streaming(CaseIndex(kind="ivfpq"), iter(chunks), n_total, x[:1000], target)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx")] == []  # no half-built folder left
    if problem == "not_an_index":
        assert (target / "notes.txt").read_text() == "mine"


def test_metadata_writer_checks_columns(tmp_path: Path) -> None:
    _, meta = _data(10)
    writer = MetadataWriter(tmp_path / "m.sqlite")
    writer.append(meta)
    with pytest.raises(ConfigError, match="differ from the first chunk"):
        writer.append(meta.drop(columns="source"))


# -- shard files ----------------------------------------------------------------------------------------------


def _manifest(n: int) -> pd.DataFrame:
    return pd.DataFrame({"image": [f"/data/img{i}.png" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                         "label": ["covid"] * n})


def test_shards_round_trip_without_pickle_and_plan_guards_the_folder(tmp_path: Path) -> None:
    df = _manifest(25)
    plan, todo = shards.open_plan(tmp_path / "e", df, "hash-a", shard_size=10)
    assert (plan.n_shards, todo) == (3, [0, 1, 2])
    rows = df.iloc[plan.rows_of(2)].assign(prob=np.linspace(0, 1, 5), case_id=[f"c{i}" for i in range(5)])
    emb = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    shards.write_shard(tmp_path / "e", 2, emb, rows, np.arange(20, 25))
    back_emb, back = shards.read_shard(shards.shard_path(tmp_path / "e", 2))
    np.testing.assert_array_equal(back_emb, emb)
    assert back["row"].tolist() == list(range(20, 25)) and back["case_id"].tolist() == rows["case_id"].tolist()
    np.testing.assert_allclose(back["prob"], rows["prob"])
    assert shards.open_plan(tmp_path / "e", df, "hash-a", shard_size=10)[1] == [0, 1]  # resumed: shard 2 is done
    with pytest.raises(ConfigError, match="different run \\(model_hash differ"):
        shards.open_plan(tmp_path / "e", df, "hash-b", shard_size=10)
    with pytest.raises(ConfigError, match="manifest_sha256"):
        shards.open_plan(tmp_path / "e", _manifest(26), "hash-a", shard_size=10)
    with pytest.raises(CaseIndexError, match="2 of 3 shard\\(s\\) missing"):
        shards.complete_shards(tmp_path / "e")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.csv").write_text("a")
    with pytest.raises(ConfigError, match="not an embedding folder"):
        shards.open_plan(tmp_path / "other", df, "hash-a")


def test_corrupt_shard_is_named(tmp_path: Path) -> None:
    df = _manifest(3)
    shards.open_plan(tmp_path, df, "h", shard_size=3)
    shards.shard_path(tmp_path, 0).write_bytes(b"not a zip")
    with pytest.raises(CaseIndexError, match="shard-00000.npz: unreadable embedding shard"):
        list(shards.iter_shards(tmp_path))


def test_index_from_shards_streams_archives_and_fits_small_ones(tmp_path: Path) -> None:
    x, meta = _data(3000)
    df = meta.assign(image=[f"/img/{c}.png" for c in meta["case_id"]])
    plan, _ = shards.open_plan(tmp_path / "e", df, "model-h", shard_size=1000)
    for i in range(plan.n_shards):
        part = df.iloc[plan.rows_of(i)]
        shards.write_shard(tmp_path / "e", i, x[plan.rows_of(i)], part, np.arange(len(df))[plan.rows_of(i)])
    small = build_from_shards(tmp_path / "e", tmp_path / "small")
    assert small.kind_ == "exact" and small.model_hash == "model-h" and len(small) == 3000
    big = build_from_shards(tmp_path / "e", tmp_path / "big", index=CaseIndex(kind="auto", archive_threshold=2000,
                                                                             nprobe=16))
    assert big.kind_ == "ivfpq" and isinstance(big._cases, SqliteCases)
    truth = small.kneighbors(x[:30], 10)[1]
    assert _recall(big.kneighbors(x[:30], 10)[1], truth) >= 0.9
    assert big.build_info["n_rows"] == 3000 and big.build_info["n_skipped"] == 0
