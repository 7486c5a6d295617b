"""Data: SSL4MIS layouts, NIfTI folders, synthetic phantoms, case-level splits, samplers, augmentations.

Typical use (what the training engine does)::

    ds = sslseg.data.load("synthetic:acdc")            # or a data root; layout detected
    split = ds.split(labeled=7, seed=0)                  # by case (patient), saved with the run
    loader = sslseg.data.make_train_loader(ds, split, patch_size=(64, 64), labeled_bs=4, unlabeled_bs=4)
    for step, batch in zip(range(1000), loader.forever()):
        batch.labeled_image, batch.labeled_label, batch.unlabeled_image
    for vol in ds.iter_volumes(split.val_cases):         # whole volumes, with spacing
        vol.image, vol.label, vol.spacing

Your own scans (an nnU-Net raw folder; ``synthetic:ct`` is one)::

    p = sslseg.data.plan("/data/Dataset042_Abdomen")     # fingerprint -> spacing, normalisation, patch
    sslseg.data.preprocess("/data/Dataset042_Abdomen", p) # memory-mapped cache (make_train_loader does it)
"""

from __future__ import annotations

from .batch import Batch, collate
from .dataset import INTENSITY_MODES, CaseDataset, EvalVolumes, Volume, load
from .errors import DataError, DataValidationError
from .fingerprint import Fingerprint, fingerprint
from .layouts import LAYOUTS, detect_layout
from .planning import Plan, plan
from .preprocess import CachedVolume, preprocess
from .resample import resample_image, resample_label, resample_probabilities
from .loader import TrainLoader, TrainSamples, make_eval_loader, make_train_loader
from .policies import ALL_OPS, GEOMETRIC_OPS, PHOTOMETRIC_OPS, CTAugment, RandAugment, StrongAugment, cutout
from .samplers import DistributedTwoStreamBatchSampler, PatchSampler, TwoStreamBatchSampler, derive_seed, seed_worker
from .splits import Split
from .synthetic import KINDS as SYNTHETIC_KINDS
from .synthetic import make_synthetic, synthetic_options
from .transforms import Augment2D, Augment3D, random_crop, resize, rot90_flip, rotate2d
from .validate import ValidationReport

__all__ = [
    "ALL_OPS",
    "Augment2D",
    "Augment3D",
    "Batch",
    "CTAugment",
    "CachedVolume",
    "CaseDataset",
    "DataError",
    "DataValidationError",
    "DistributedTwoStreamBatchSampler",
    "EvalVolumes",
    "Fingerprint",
    "GEOMETRIC_OPS",
    "INTENSITY_MODES",
    "LAYOUTS",
    "PHOTOMETRIC_OPS",
    "PatchSampler",
    "Plan",
    "RandAugment",
    "SYNTHETIC_KINDS",
    "Split",
    "StrongAugment",
    "TrainLoader",
    "TrainSamples",
    "TwoStreamBatchSampler",
    "ValidationReport",
    "Volume",
    "collate",
    "cutout",
    "derive_seed",
    "detect_layout",
    "fingerprint",
    "load",
    "make_eval_loader",
    "make_synthetic",
    "make_train_loader",
    "plan",
    "preprocess",
    "random_crop",
    "resample_image",
    "resample_label",
    "resample_probabilities",
    "resize",
    "rot90_flip",
    "rotate2d",
    "seed_worker",
    "synthetic_options",
]
