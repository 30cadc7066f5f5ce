"""The training core's device choices: autocast dtype and memory format per device."""
from __future__ import annotations

import pytest
import torch

import engine
from engine import resolve_amp
from metrics import BCEDiceLoss
from models import build_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, None)])
def test_cpu_auto_uses_bf16_only_where_the_cpu_computes_it(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_amp("auto", CPU) == expected
    assert resolve_amp("bf16", CPU) == torch.bfloat16  # asked for explicitly: honoured, even if emulated
    assert resolve_amp("off", CPU) is None


def test_fp16_on_cpu_falls_back_to_fp32_and_says_so(capsys):
    assert resolve_amp("fp16", CPU) is None
    assert "--amp fp16 is CUDA-only" in capsys.readouterr().out


@pytest.mark.parametrize("bf16_gpu, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_auto_prefers_bf16_and_falls_back_to_fp16(monkeypatch, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert resolve_amp("auto", CUDA) == expected
    assert resolve_amp("off", CUDA) is None


def test_native_bf16_query_matches_the_cpu_flags():
    # The oneDNN query must agree with the kernel's CPU flags, so `auto` never picks emulated bf16.
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo on this platform")
    hardware = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert engine.cpu_has_native_bf16() == (hardware and torch.backends.mkldnn.is_available())


def test_the_cpu_fast_path_trains_like_fp32():
    # One SGD step under the CPU fast path (resolve_amp + memory_format) moves the loss like the fp32 NCHW step.
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 64)
    y = (x > 0.5).float()
    losses = {}
    for path in ("fp32", "fast"):
        torch.manual_seed(1)
        model = build_model("unet", base_channels=8)
        dtype = resolve_amp("bf16", CPU) if path == "fast" else None
        layout = engine.memory_format(CPU) if path == "fast" else torch.contiguous_format
        model = model.to(memory_format=layout)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        trace = []
        for _ in range(3):
            with engine.autocast(CPU, dtype):
                loss = BCEDiceLoss(1.0)(model(x.contiguous(memory_format=layout)).float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trace.append(loss.item())
        losses[path] = trace
    assert losses["fast"][-1] < losses["fast"][0]
    assert losses["fast"] == pytest.approx(losses["fp32"], rel=0.03)
