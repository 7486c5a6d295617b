"""``sslseg data`` subcommands, through a parser built here."""

from __future__ import annotations

import argparse

import h5py

from sslseg.data.cli import register_cli


def _run(argv):
    parser = argparse.ArgumentParser(prog="sslseg")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_make_synthetic_then_check(tmp_path, capsys):
    out = tmp_path / "la"
    assert _run(["data", "make-synthetic", "la", str(out), "--cases", "3", "--size", "16"]) == 0
    assert (out / "train.list").is_file()
    assert _run(["data", "check", str(out)]) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    case = (out / "train.list").read_text().split()[0]
    with h5py.File(out / "2018LA_Seg_Training Set" / case / "mri_norm2.h5", "a") as f:
        f["label"][0, 0, 0] = 9
    assert _run(["data", "check", str(out)]) == 1
    text = capsys.readouterr().out
    assert f"{case}/mri_norm2.h5: label values [9] outside [0, 2)" in text
    assert _run(["data", "info", "synthetic:la?cases=3&size=16"]) == 0
    assert "3 cases" in capsys.readouterr().out


def test_check_missing_folder(tmp_path, capsys):
    assert _run(["data", "check", str(tmp_path / "nope")]) == 2
    assert "data folder not found" in capsys.readouterr().err
