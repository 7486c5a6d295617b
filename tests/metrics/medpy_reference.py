"""medpy.metric.binary (0.5.2) where it is installed, else a transcription of its definitions.

The transcription is medpy's code (``__surface_distances``, ``hd``, ``hd95``, ``asd``, ``assd``,
``dc``, ``jc``) on scipy, so the tests need no medpy; where medpy is installed they compare
against medpy itself.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure


def _surface_distances(result, reference, voxelspacing=None, connectivity=1):
    result = np.atleast_1d(result.astype(np.bool_))
    reference = np.atleast_1d(reference.astype(np.bool_))
    footprint = generate_binary_structure(result.ndim, connectivity)
    if 0 == np.count_nonzero(result):
        raise RuntimeError("The first supplied array does not contain any binary object.")
    if 0 == np.count_nonzero(reference):
        raise RuntimeError("The second supplied array does not contain any binary object.")
    result_border = result ^ binary_erosion(result, structure=footprint, iterations=1)
    reference_border = reference ^ binary_erosion(reference, structure=footprint, iterations=1)
    dt = distance_transform_edt(~reference_border, sampling=voxelspacing)
    return dt[result_border]


class _Transcription:
    @staticmethod
    def hd(result, reference, voxelspacing=None, connectivity=1):
        return max(_surface_distances(result, reference, voxelspacing, connectivity).max(),
                   _surface_distances(reference, result, voxelspacing, connectivity).max())

    @staticmethod
    def hd95(result, reference, voxelspacing=None, connectivity=1):
        hd1 = _surface_distances(result, reference, voxelspacing, connectivity)
        hd2 = _surface_distances(reference, result, voxelspacing, connectivity)
        return np.percentile(np.hstack((hd1, hd2)), 95)

    @staticmethod
    def asd(result, reference, voxelspacing=None, connectivity=1):
        return _surface_distances(result, reference, voxelspacing, connectivity).mean()

    @staticmethod
    def assd(result, reference, voxelspacing=None, connectivity=1):
        return np.concatenate([_surface_distances(result, reference, voxelspacing, connectivity),
                               _surface_distances(reference, result, voxelspacing, connectivity)]).mean()

    @staticmethod
    def dc(result, reference):
        result, reference = np.atleast_1d(result.astype(np.bool_)), np.atleast_1d(reference.astype(np.bool_))
        intersection = np.count_nonzero(result & reference)
        size = np.count_nonzero(result) + np.count_nonzero(reference)
        return 2.0 * intersection / float(size) if size else 0.0

    @staticmethod
    def jc(result, reference):
        result, reference = np.atleast_1d(result.astype(np.bool_)), np.atleast_1d(reference.astype(np.bool_))
        return float(np.count_nonzero(result & reference)) / float(np.count_nonzero(result | reference))


try:  # the real thing where installed (a test/bench dependency only)
    from medpy.metric import binary as medpy_binary

    SOURCE = "medpy"
except ImportError:  # pragma: no cover - depends on the environment
    medpy_binary = _Transcription()
    SOURCE = "transcription"

transcription = _Transcription()
