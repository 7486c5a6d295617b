"""Mixed precision: ``amp="auto"`` picks bf16 only where the device computes it natively, every verb
(fit, evaluate, infer) follows the same rule, and the run says what it chose."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import yaml

import sslseg
from sslseg.engine import EngineConfig, fit
from sslseg.utils import precision
from sslseg.utils.precision import native_bf16, resolve_amp

TINY = "synthetic:acdc?cases=6&slices=2&size=32"
OPTS = dict(batch_size=4, labeled_bs=2, val_every=2, log_every=1, patch_size=[32, 32], progress=False,
            tensorboard=False)


def _cpu_probes(monkeypatch, *, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize(("avx512_bf16", "amx", "native", "names"), [
    (True, False, True, "avx512_bf16"), (False, True, True, "AMX"), (True, True, True, "avx512_bf16, AMX"),
    (False, False, False, "no avx512_bf16 or AMX"),
])
def test_cpu_detection_reads_torchs_probes(monkeypatch, avx512_bf16, amx, native, names):
    _cpu_probes(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    found, why = native_bf16("cpu")
    assert found is native and names in why
    chosen = resolve_amp("auto", "cpu")
    assert chosen.chosen == ("bf16" if native else "none")
    assert chosen.dtype is (torch.bfloat16 if native else None)
    assert chosen.describe().startswith("bf16 (auto:" if native else "off (float32) (auto:")


def test_cpu_detection_without_the_probes_is_float32(monkeypatch):
    # A torch without these private probes: never guess bf16.
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert resolve_amp("auto", "cpu").chosen == "none"


def test_cuda_detection_follows_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    assert native_bf16("cuda:0") == (False, "GPU sm_75 has no native bf16 (needs sm_80 or newer)")
    assert resolve_amp("auto", "cuda:0").chosen == "none"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert resolve_amp("auto", "cuda:0") == ("auto", "bf16", "GPU sm_90 has bf16 tensor cores")
    assert resolve_amp("fp16", "cuda:0").dtype is torch.float16


def test_forced_choices_and_refusals():
    assert resolve_amp("none", "cpu").dtype is None
    assert resolve_amp(None, "cpu").chosen == "none"  # configs written before "auto" existed: float32
    assert resolve_amp("bf16", "cpu").describe() == "bf16 (forced)"
    with pytest.raises(ValueError, match=r"amp: expected one of auto, none, bf16, fp16, got 'fp32'"):
        resolve_amp("fp32", "cpu")
    with pytest.raises(ValueError, match=r"amp='fp16' needs a CUDA device .* the device is cpu"):
        resolve_amp("fp16", "cpu")
    assert EngineConfig().amp == "auto"
    assert EngineConfig(amp=None).amp is None
    with pytest.raises(ValueError, match=r"amp must be one of auto, none, bf16, fp16, got 'fp32'"):
        EngineConfig(amp="fp32")


def _train(tmp_path, name, amp, monkeypatch=None, native=None):
    if monkeypatch is not None:
        _cpu_probes(monkeypatch, avx512_bf16=native, amx=False)
    return fit("supervised", TINY, labeled=2, iterations=2, seed=0, device="cpu", out_dir=tmp_path / name, amp=amp,
               engine_options=OPTS)


def _losses(run) -> list[dict]:
    """The history without its timings."""
    return [{k: v for k, v in row.items() if k.startswith("loss")} for row in run.history]


def test_auto_trains_in_what_it_chose_and_records_it(tmp_path, monkeypatch, capsys):
    with torch.random.fork_rng():
        forced = _train(tmp_path, "bf16", "bf16")
        auto_native = _train(tmp_path, "auto-native", "auto", monkeypatch, native=True)
        auto_plain = _train(tmp_path, "auto-plain", "auto", monkeypatch, native=False)
        fp32 = _train(tmp_path, "none", "none")
    # auto on a bf16 CPU is the bf16 run, step for step; auto elsewhere is the float32 run.
    assert _losses(auto_native) == _losses(forced)
    assert _losses(auto_plain) == _losses(fp32)
    assert _losses(auto_native) != _losses(fp32)  # the precision did change the computation
    cfg = yaml.safe_load((auto_native.dir / "config.yaml").read_text())
    assert cfg["engine"]["amp"] == "auto"
    assert cfg["precision"] == {"requested": "auto", "chosen": "bf16", "why": "CPU with native bf16 (avx512_bf16)"}
    assert yaml.safe_load((auto_plain.dir / "config.yaml").read_text())["precision"]["chosen"] == "none"
    out = capsys.readouterr().out
    assert "AMP bf16 (auto: CPU with native bf16 (avx512_bf16))" in out
    assert "AMP off (float32) (auto: CPU without native bf16" in out
    assert "AMP bf16 (forced)" in out


def test_old_configs_without_auto_resume_in_float32(tmp_path, monkeypatch):
    run = _train(tmp_path, "old", "none")
    cfg_path = run.dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["engine"]["amp"] = None  # as written before amp="auto"
    del cfg["precision"]
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _cpu_probes(monkeypatch, avx512_bf16=True, amx=False)
    resumed = fit("supervised", resume=run.dir, iterations=4)
    assert yaml.safe_load(cfg_path.read_text())["precision"]["chosen"] == "none"
    assert resumed.history[-1]["step"] == 4


def test_infer_and_evaluate_follow_the_same_rule(tmp_path, monkeypatch):
    run = _train(tmp_path, "run", "none")
    volume = np.random.default_rng(0).normal(size=(2, 32, 32)).astype(np.float32)
    labels = {amp: sslseg.infer(run, volume, probabilities=True, amp=amp, spacing=(1.0, 1.0, 1.0))
              for amp in ("none", "bf16")}
    _cpu_probes(monkeypatch, avx512_bf16=True, amx=False)
    auto = sslseg.infer(run, volume, probabilities=True, amp="auto", spacing=(1.0, 1.0, 1.0))
    assert torch.equal(auto[1], labels["bf16"][1])  # auto on a bf16 CPU: the bf16 forward
    # bf16 forwards move the probabilities a little, never far.
    assert not torch.equal(labels["bf16"][1], labels["none"][1])
    torch.testing.assert_close(labels["bf16"][1], labels["none"][1], atol=0.05, rtol=0)
    assert inspect.signature(sslseg.evaluate).parameters["amp"].default == "none"  # scores: float32 by default
    scores = {amp: sslseg.evaluate(run, split="test", amp=amp, out=False).summary for amp in ("none", "auto")}
    dice = {amp: s["overall"]["dice"]["mean"] for amp, s in scores.items()}
    assert dice["auto"] == pytest.approx(dice["none"], abs=0.05)
    _cpu_probes(monkeypatch, avx512_bf16=False, amx=False)
    plain = sslseg.infer(run, volume, probabilities=True, amp="auto", spacing=(1.0, 1.0, 1.0))
    assert torch.equal(plain[1], labels["none"][1])


def test_cli_takes_every_choice():
    from sslseg.app.cli import build_parser

    parser = build_parser()
    for verb, extra in (("fit", ["supervised"]), ("evaluate", ["run"]), ("infer", ["run", "x.nii", "--out", "o"])):
        for amp in precision.AMP_CHOICES:
            assert parser.parse_args([verb, *extra, "--amp", amp]).amp == amp
        with pytest.raises(SystemExit):
            parser.parse_args([verb, *extra, "--amp", "fp32"])


def test_cpu_3d_training_runs_bf16_with_the_depth2_workaround(monkeypatch):
    """3D training on a bf16 CPU runs bf16, and says that the Conv3d layers on depth-2 feature maps
    train in float32 (oneDNN's bf16 weight gradient is wrong there)."""
    _cpu_probes(monkeypatch, avx512_bf16=True, amx=False)
    chosen = resolve_amp("auto", "cpu", dim=3, training=True)
    assert chosen.chosen == "bf16" and chosen.why.endswith(precision.CPU_CONV3D_DEPTH2)
    assert resolve_amp("auto", "cpu", dim=3) == ("auto", "bf16", "CPU with native bf16 (avx512_bf16)")
    assert resolve_amp("auto", "cpu", dim=2, training=True).why == "CPU with native bf16 (avx512_bf16)"
    forced = resolve_amp("bf16", "cpu", dim=3, training=True)
    assert forced.describe() == f"bf16 (forced; {precision.CPU_CONV3D_DEPTH2})"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert resolve_amp("auto", "cuda:0", dim=3, training=True) == ("auto", "bf16", "GPU sm_90 has bf16 tensor cores")


def _conv_out(layer, depth, *, dim=3, training=True, grad=True, dtype=torch.bfloat16):
    x = torch.randn(2, layer.in_channels, depth, 6, 6)
    with precision.autocast(dtype, "cpu", dim=dim, training=training), torch.set_grad_enabled(grad):
        return layer(x)


def test_autocast_routes_exactly_the_defective_convolutions_to_float32():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 4, 3, padding=1)
    assert _conv_out(conv, 2).dtype == torch.float32  # depth 2, kernel depth 3, gradient: float32
    for depth in (1, 3, 4):
        assert _conv_out(conv, depth).dtype == torch.bfloat16
    assert _conv_out(torch.nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1)), 2).dtype == torch.bfloat16
    assert _conv_out(torch.nn.ConvTranspose3d(4, 4, 3, padding=1), 2).dtype == torch.float32
    assert _conv_out(conv, 2, grad=False).dtype == torch.bfloat16  # forward passes are exact: bf16
    assert _conv_out(conv, 2, training=False).dtype == torch.bfloat16  # inference contexts: plain autocast
    assert _conv_out(conv, 2, dim=2).dtype == torch.bfloat16
    assert _conv_out(conv, 2, dtype=None).dtype == torch.float32  # float32 run: no autocast at all
    x = torch.randn(1, 4, 2, 5, 5)
    with precision.autocast(torch.bfloat16, "cpu", dim=3, training=True):
        by_keyword = torch.nn.functional.conv3d(input=x, weight=conv.weight, bias=conv.bias, padding=1)
    assert by_keyword.dtype == torch.float32
    assert torch.is_autocast_enabled("cpu") is False  # the contexts are left as found


def test_depth2_weight_gradient_under_bf16_is_the_float32_gradient():
    """The weight gradient of a depth-2 Conv3d trained under the run's bf16 autocast is computed in
    float32: identical to the float32 gradient, on every repeat (oneDNN's bf16 one is not)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 2, 8, 8)

    def weight_grad(dtype):
        conv.zero_grad()
        with precision.autocast(dtype, "cpu", dim=3, training=True):
            y = conv(x)
        y.float().square().mean().backward()
        return conv.weight.grad.clone()

    reference = weight_grad(None)
    for _ in range(3):
        assert torch.equal(weight_grad(torch.bfloat16), reference)


def test_3d_training_in_bf16_on_the_cpu_is_reproducible(tmp_path):
    """A 3D U-Net on 32-voxel patches has a depth-2 bottleneck: bf16 training must still give the
    same losses on every run, and finite ones."""
    opts = dict(OPTS, patch_size=[32, 32, 32], batch_size=2, labeled_bs=1, val_every=10**6)
    runs = [fit("supervised", "synthetic:la?cases=4&size=32", labeled=2, iterations=3, seed=0, device="cpu",
                out_dir=tmp_path / f"r{i}", amp="bf16", engine_options=opts) for i in range(2)]
    assert _losses(runs[0]) == _losses(runs[1])
    assert all(np.isfinite(v) for row in _losses(runs[0]) for v in row.values())
