"""Every method trains from the command line with its defaults on each default synthetic dataset of
its dimension (ACDC in 2D; LA and BraTS in 3D): the default patch is derived from the data and
rounded for every network the method builds (CTCT's Swin-UNet needs a multiple of 32 where the
2D rule gives 80), the default network and options are used. The phantoms are small versions of
the defaults (fewer cases; 3D volumes of 40 voxels, so the 3D rule rounds the patch down to 32)
and each run is one step, so that the whole grid stays within CI's budget."""

from __future__ import annotations

import json

import pytest
import yaml

from sslseg.app.cli import main
from sslseg.methods import get_method, list_methods

DATA = {
    2: ["synthetic:acdc?cases=6&slices=2"],  # in-plane 80, the ACDC default
    3: ["synthetic:la?cases=6&size=40", "synthetic:brats?cases=6&size=40"],
}
GRID = [(name, data) for name in list_methods() for dim in get_method(name).dims for data in DATA[dim]]


def test_grid_covers_every_method_and_dataset():
    assert {n for n, _ in GRID} == set(list_methods())
    assert {d.split("?")[0] for _, d in GRID} == {"synthetic:acdc", "synthetic:la", "synthetic:brats"}


@pytest.mark.parametrize(("name", "data"), GRID, ids=[f"{n}-{d.split('?')[0][10:]}" for n, d in GRID])
def test_method_fits_from_the_cli_with_its_defaults(name, data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["fit", name, "--data", data, "--labeled", "2", "--iterations", "1", "--out", str(out),
               "--set", "batch_size=2", "--set", "val_cases=1", "--set", "tensorboard=false"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method_name"] == name and config["engine"]["model"] is None  # the default network
    # The patch the engine chose (saved, and printed in the header) fits every network of the method.
    patch = config["engine"]["patch_size"]
    expected = {2: [64, 64] if name == "ctct" else [80, 80], 3: [32, 32, 32]}[len(patch)]
    assert patch == expected, (name, data, patch)
    assert f"| {name} on " in captured.out and f"| patch {'x'.join(map(str, patch))}" in captured.out
    validations = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validations] == [1] and 0.0 <= validations[0]["dice"] <= 1.0
