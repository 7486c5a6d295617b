"""Case-level splits: disjointness, reproducibility, k-fold, JSON round-trip."""

from __future__ import annotations

import json

import pytest

from sslseg.data import DataError, Split, load

from .conftest import TINY_SPEC


@pytest.fixture(scope="module")
def acdc():
    return load(TINY_SPEC["acdc"])


def _groups(s: Split):
    return [s.labeled_cases, s.unlabeled_cases, s.val_cases, s.test_cases]


def test_groups_disjoint_and_cover_official(acdc):
    s = acdc.split(labeled=3, seed=0)
    flat = [c for g in _groups(s) for c in g]
    assert len(flat) == len(set(flat)) == len(acdc.cases)
    assert set(s.train_cases) == set(acdc.official["train"])
    assert s.val_cases == acdc.official["val"] and s.test_cases == acdc.official["test"]
    assert len(s.labeled_cases) == 3


def test_labeled_by_case_reproducible_and_seeded(acdc):
    a, b = acdc.split(labeled=3, seed=5), acdc.split(labeled=3, seed=5)
    assert a == b
    draws = {acdc.split(labeled=3, seed=s).labeled_cases for s in range(8)}
    assert len(draws) > 1
    assert all(set(d) <= set(acdc.official["train"]) for d in draws)


def test_fraction_and_all(acdc):
    assert len(acdc.split(labeled=0.3).labeled_cases) == 2  # round(0.3 * 7)
    full = acdc.split(labeled=None)
    assert len(full.labeled_cases) == 7 and full.unlabeled_cases == ()


def test_ssl4mis_order_takes_first_cases(acdc):
    s = acdc.split(labeled=3, order="ssl4mis", seed=123)
    assert s.labeled_cases == acdc.official["train"][:3]


def test_kfold_disjoint_and_complete(acdc):
    pool = set(acdc.official["train"]) | set(acdc.official["val"])
    vals = [set(acdc.split(labeled=2, fold=k, folds=4).val_cases) for k in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not vals[i] & vals[j]
    assert set().union(*vals) == pool
    for k in range(4):
        s = acdc.split(labeled=2, fold=k, folds=4, seed=k)
        assert set(s.train_cases) == pool - vals[k]
        assert set(s.labeled_cases) <= set(s.train_cases)
        assert s.test_cases == acdc.official["test"]  # test never enters cross-validation


def test_no_val_list_carves_from_train():
    la = load(TINY_SPEC["la"])  # UA-MT layout: train/test only
    s = la.split(labeled=1)
    assert s.val_cases and set(s.val_cases) <= set(la.official["train"])
    assert s.test_cases == la.official["test"]


def test_json_round_trip(acdc, tmp_path):
    s = acdc.split(labeled=2, seed=3, fold=1, folds=3)
    path = s.save(tmp_path / "run" / "split.json")
    assert json.loads(path.read_text())["labeled_cases"] == list(s.labeled_cases)
    assert Split.load(path) == s
    assert acdc.load_split(path) == s


def test_split_errors(acdc, tmp_path):
    with pytest.raises(ValueError, match="labeled must be between 1 and the number of training cases \\(7\\), got 8"):
        acdc.split(labeled=8)
    with pytest.raises(ValueError, match="labeled as a fraction must be in \\(0, 1\\], got 1.5"):
        acdc.split(labeled=1.5)
    with pytest.raises(ValueError, match="unknown order 'ssl4'; did you mean 'ssl4mis'"):
        acdc.split(labeled=2, order="ssl4")
    with pytest.raises(ValueError, match="fold must be an int in \\[0, 5\\), got 5"):
        acdc.split(labeled=2, fold=5)
    with pytest.raises(ValueError, match="must be disjoint: case 'a' is in both labeled_cases and test_cases"):
        Split(("a",), (), (), ("a",))
    bad = Split(("nobody",), (), (), ())
    with pytest.raises(DataError, match="split labeled_cases names cases not in dataset .*'nobody'"):
        acdc.check_split(bad)
    (tmp_path / "s.json").write_text('{"labeled_cases": [], "bogus": 1}')
    with pytest.raises(TypeError, match="unknown split keys \\['bogus'\\]"):
        Split.load(tmp_path / "s.json")
