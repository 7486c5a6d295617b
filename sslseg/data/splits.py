"""Case-level splits: labeled / unlabeled / validation / test, k-fold, JSON round-trip.

Labeled data is chosen by CASE (patient), never by a slice-count table: with ACDC, ``labeled=7``
means seven patients (both frames, every slice), whatever number of slices that is.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import check_choice

SPLIT_ORDERS = ("random", "ssl4mis")
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Split:
    """Which cases are labeled, unlabeled, validation and test.

    The four groups are disjoint. ``labeled_cases + unlabeled_cases`` are the training cases.

    Attributes:
        labeled_cases: training cases whose labels a method may see.
        unlabeled_cases: training cases used as unlabeled data (their labels are never loaded).
        val_cases: cases for model selection (validation).
        test_cases: held-out cases for the final report; never used for selection.
        dataset: name of the dataset the split was made for.
        seed: seed of the labeled-case draw.
        order: ``"random"`` (seeded draw) or ``"ssl4mis"`` (first N in list order).
        fold: cross-validation fold, or None.
        folds: number of folds when ``fold`` is set.
        fold_seed: seed of the fold assignment (and of any val/test carving).
    """

    labeled_cases: tuple[str, ...]
    unlabeled_cases: tuple[str, ...]
    val_cases: tuple[str, ...]
    test_cases: tuple[str, ...]
    dataset: str = ""
    seed: int = 0
    order: str = "random"
    fold: int | None = None
    folds: int = 5
    fold_seed: int = 0
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        groups = {
            "labeled_cases": self.labeled_cases,
            "unlabeled_cases": self.unlabeled_cases,
            "val_cases": self.val_cases,
            "test_cases": self.test_cases,
        }
        for name, cases in groups.items():
            object.__setattr__(self, name, tuple(str(c) for c in cases))
        seen: dict[str, str] = {}
        for name, cases in groups.items():
            for c in cases:
                if c in seen:
                    raise ValueError(
                        f"split groups must be disjoint: case {c!r} is in both {seen[c]} and {name}"
                    )
                seen[c] = name

    @property
    def train_cases(self) -> tuple[str, ...]:
        """Labeled plus unlabeled cases."""
        return self.labeled_cases + self.unlabeled_cases

    def to_dict(self) -> dict:
        """A JSON-ready dict (lists, not tuples)."""
        d = asdict(self)
        for k in ("labeled_cases", "unlabeled_cases", "val_cases", "test_cases"):
            d[k] = list(d[k])
        d["format_version"] = _FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Split:
        """Inverse of :meth:`to_dict`; unknown keys are a ``TypeError`` naming the accepted ones."""
        d = dict(d)
        d.pop("format_version", None)
        accepted = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - accepted)
        if unknown:
            raise TypeError(f"unknown split keys {unknown}; accepted: {sorted(accepted)}")
        missing = [k for k in ("labeled_cases", "unlabeled_cases", "val_cases", "test_cases") if k not in d]
        if missing:
            raise ValueError(f"split is missing required keys {missing}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the split as JSON (saved with every run) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Split:
        """Read a split written by :meth:`save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"split file {path} not found") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a valid split JSON file ({exc})") from None
        return cls.from_dict(data)

    def summary(self) -> str:
        """One line: group sizes and how the split was made."""
        how = f"order={self.order}, seed={self.seed}"
        if self.fold is not None:
            how += f", fold={self.fold}/{self.folds}"
        return (
            f"{len(self.labeled_cases)} labeled / {len(self.unlabeled_cases)} unlabeled / "
            f"{len(self.val_cases)} val / {len(self.test_cases)} test cases ({how})"
        )


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def _carve(cases: list[str], fraction: float, seed: int, salt: int) -> tuple[list[str], list[str]]:
    """Remove ``round(fraction * n)`` seeded cases from ``cases``; return (rest, carved)."""
    n = len(cases)
    k = int(round(fraction * n))
    if fraction > 0 and k == 0 and n >= 3:
        k = 1  # a requested held-out group must not silently vanish on small datasets
    if k <= 0:
        return list(cases), []
    chosen = set(_rng(seed, salt).permutation(n)[:k].tolist())
    rest = [c for i, c in enumerate(cases) if i not in chosen]
    carved = [c for i, c in enumerate(cases) if i in chosen]
    return rest, carved


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _num_labeled(labeled: int | float | str | None, n_train: int) -> int:
    if labeled is None or (isinstance(labeled, str) and labeled == "all"):
        return n_train
    if isinstance(labeled, str):
        raise ValueError(f"labeled must be an int (cases), a float in (0, 1], 'all' or None, got {labeled!r}")
    if isinstance(labeled, bool):
        raise TypeError(f"labeled must be an int (cases), a float in (0, 1] or None, got {labeled!r}")
    if isinstance(labeled, (int, np.integer)):
        if not 1 <= labeled <= n_train:
            raise ValueError(
                f"labeled must be between 1 and the number of training cases ({n_train}), got {labeled}"
            )
        return int(labeled)
    if isinstance(labeled, float):
        if not 0 < labeled <= 1:
            raise ValueError(f"labeled as a fraction must be in (0, 1], got {labeled}")
        return max(1, min(n_train, int(math.floor(labeled * n_train + 0.5))))
    raise TypeError(f"labeled must be an int (cases), a float in (0, 1] or None, got {labeled!r}")


def make_split(
    cases: Sequence[str],
    official: dict[str, Sequence[str]],
    *,
    labeled: int | float | None = None,
    seed: int = 0,
    order: str = "random",
    fold: int | None = None,
    folds: int = 5,
    fold_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    dataset: str = "",
) -> Split:
    """Split ``cases`` (see :meth:`sslseg.data.CaseDataset.split` for the rules)."""
    check_choice("order", order, SPLIT_ORDERS)
    for name, v in (("seed", seed), ("fold_seed", fold_seed)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)

    train = list(official.get("train", ()))
    val = list(official.get("val", ()))
    test = list(official.get("test", ()))
    # Images without labels (NIfTI folders) are unlabeled whatever else happens.
    pool_unlabeled = list(official.get("unlabeled", ()))
    no_labels = set(pool_unlabeled)
    if not train and not val and not test:
        # No lists (NIfTI folders): carve test, then val, from the labeled cases, seeded by fold_seed.
        train, test = _carve([c for c in cases if c not in no_labels], test_fraction, fold_seed, 1)
        train, val = _carve(train, val_fraction, fold_seed, 2)
    elif not val and fold is None:
        # LA (UA-MT) ships train/test only: take validation from train, never from test.
        train, val = _carve(train, val_fraction, fold_seed, 2)

    if fold is not None:
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise ValueError(f"folds must be an int >= 2, got {folds!r}")
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
            raise ValueError(f"fold must be an int in [0, {folds}), got {fold!r}")
        pool = train + val
        if len(pool) < folds:
            raise ValueError(f"folds={folds} needs at least {folds} train+val cases, the dataset has {len(pool)}")
        perm = _rng(fold_seed, 3).permutation(len(pool))
        in_fold = {int(i) for j, i in enumerate(perm) if j % folds == fold}
        val = [c for i, c in enumerate(pool) if i in in_fold]
        train = [c for i, c in enumerate(pool) if i not in in_fold]

    if not train:
        raise ValueError(f"dataset {dataset!r} has no labeled training cases to split"
                         + (f" ({len(pool_unlabeled)} unlabeled images)" if pool_unlabeled else ""))
    if pool_unlabeled and isinstance(labeled, (int, np.integer)) and not isinstance(labeled, bool) and labeled > len(train):
        raise ValueError(
            f"labeled={labeled} asks for more labeled cases than exist: dataset {dataset!r} has "
            f"{len(train) + len(val) + len(test)} labeled cases ({len(val)} validation, {len(test)} test, "
            f"{len(train)} left for training) and {len(pool_unlabeled)} unlabeled images"
        )
    n = _num_labeled(labeled, len(train))
    if order == "ssl4mis":
        chosen = set(range(n))
    else:
        chosen = set(_rng(seed, 4).permutation(len(train))[:n].tolist())
    # Keep list order inside each group so splits read naturally and diff cleanly.
    labeled_cases = [c for i, c in enumerate(train) if i in chosen]
    unlabeled_cases = [c for i, c in enumerate(train) if i not in chosen] + pool_unlabeled
    meta = {}
    if pool_unlabeled:
        meta = {
            "unlabeled_images": len(pool_unlabeled),
            "rule": "validation drawn from the labeled training cases (seeded by fold_seed); test = imagesTs "
                    "with labelsTs when present, else drawn from the labeled cases; labeled=N takes N of the "
                    "remaining labeled cases (seeded by seed); every image without a label is unlabeled",
        }
    return Split(
        labeled_cases=tuple(labeled_cases),
        unlabeled_cases=tuple(unlabeled_cases),
        val_cases=tuple(val),
        test_cases=tuple(test),
        dataset=dataset,
        seed=int(seed),
        order=order,
        fold=fold,
        folds=int(folds),
        fold_seed=int(fold_seed),
        meta=meta,
    )
