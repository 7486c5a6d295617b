"""The user-facing verbs, one module each: the command line and what it calls on files and runs.

* :mod:`sslseg.app.cli`: the ``sslseg`` command (``python -m sslseg``).
* :mod:`sslseg.app.evaluate`: :func:`~sslseg.app.evaluate.evaluate`, metrics of a model on a dataset.
* :mod:`sslseg.app.infer`: :func:`~sslseg.app.infer.infer`, scans in, label maps out.
* :mod:`sslseg.app.export`: :func:`~sslseg.app.export.export`, verified TorchScript / ONNX / pt2 files.
* :mod:`sslseg.app.sweep`: grids of runs; :mod:`sslseg.app.report`: their tables and plots.

This is the top layer: it may import every other part of sslseg, and nothing below imports it.
Submodules are imported on use, so ``import sslseg.app`` stays cheap.
"""
