"""Mixed precision, channels-last and torch.compile for every method's training step (common.device)."""

import contextlib
import copy

import pytest
import torch
from torch import nn

from common import device
from common.device import Precision, maybe_compile
from common.errors import UserError

CPU = torch.device("cpu")


def test_precision_from_the_switches(monkeypatch, capsys):
    assert Precision.build(CPU, False) == Precision(CPU, None, False, None)  # float32 on CPU: no channels-last
    bf16 = Precision.build(CPU, True)
    assert (bf16.dtype, bf16.channels_last, bf16.scaler) == (torch.bfloat16, True, None)
    assert Precision.build(CPU, True, cnn=False).channels_last is False  # a ViT has no 4-D activations to convert
    fp16 = Precision.build(CPU, True, "float16")
    assert fp16.dtype == torch.float16 and isinstance(fp16.scaler, torch.amp.GradScaler)
    assert Precision.build(torch.device("cuda"), False).channels_last is True  # CNNs on CUDA, as before
    capsys.readouterr()
    assert Precision.build(CPU, True, float64=True).dtype is None  # the equivalence checks win
    assert "--float64 trains in float64" in capsys.readouterr().out
    monkeypatch.setattr(device, "native_low_precision", lambda dtype: False)
    Precision.build(CPU, True)
    assert "no bfloat16 arithmetic in hardware" in capsys.readouterr().out
    Precision.build(CPU, True, main=False)  # other ranks stay quiet
    assert capsys.readouterr().out == ""
    with pytest.raises(UserError, match="float32"):
        Precision.build(CPU, True, "float32")


def test_autocast_and_memory_format():
    conv = nn.Conv2d(3, 4, 3)
    p = Precision.build(CPU, True)
    p.model(conv)
    images = p.images(torch.randn(2, 3, 8, 8))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert images.is_contiguous(memory_format=torch.channels_last)
    with p.autocast():
        assert conv(images).dtype == torch.bfloat16
    with Precision(CPU).autocast():
        assert conv(images).dtype == torch.float32


def _step(precision, clip_seen, lr=0.5):
    """One SGD step of a seeded linear model under ``precision``; the new weight (``clip_seen`` gets the gradient
    the clipping saw)."""
    torch.manual_seed(0)
    model, x = nn.Linear(6, 3), torch.randn(5, 6)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with precision.autocast():
        loss = model(x).float().pow(2).mean()
    optimizer.zero_grad()
    precision.step(
        loss, optimizer, lambda: clip_seen.append(model.weight.grad.clone()) if clip_seen is not None else None
    )
    return model.weight.detach().clone()


def test_float16_step_scales_the_loss_and_clips_unscaled_gradients():
    """fp16 + GradScaler: backward of the scaled loss, ``clip`` sees the true gradient, the step applies it; the
    same as the unscaled step in that precision."""
    plain, scaled = Precision(CPU, torch.float16), Precision.build(CPU, True, "float16", main=False)
    seen_plain, seen_scaled = [], []
    w_plain, w_scaled = _step(plain, seen_plain), _step(scaled, seen_scaled)
    assert scaled.scaler.get_scale() == 65536.0  # the loss was scaled (no overflow, scale unchanged)
    torch.testing.assert_close(seen_scaled[0], seen_plain[0], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(w_scaled, w_plain, rtol=1e-3, atol=1e-6)


def test_compile_refusals_are_one_line(monkeypatch):
    model = nn.Linear(2, 2)
    assert maybe_compile(model, False, CPU) is model and model._compiled_call_impl is None
    monkeypatch.setattr(device, "_cxx_compiler", lambda: None)
    with pytest.raises(UserError, match="needs a C.. compiler"):
        maybe_compile(model, True, CPU)
    with pytest.raises(UserError, match="torchrun"):
        maybe_compile(model, True, torch.device("cuda"), devices=2)


@pytest.mark.skipif(device._cxx_compiler() is None, reason="torch.compile on CPU needs a C++ compiler (none on PATH)")
def test_inductor_compiles_a_mixed_precision_training_step():
    """The real thing, on a tiny CNN: inductor's C++ kernels give the eager step's loss and gradients, and the
    compiled model keeps its state-dict keys (checkpoints and model files unchanged)."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    compiled = maybe_compile(copy.deepcopy(eager), True, CPU)
    p, x = Precision.build(CPU, True, main=False), torch.randn(2, 3, 8, 8)
    grads = []
    for model in (eager, compiled):
        p.model(model)
        with p.autocast():
            loss = model(p.images(x)).float().pow(2).sum()
        loss.backward()
        grads.append(model[0].weight.grad)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=2e-3)  # bf16 rounding in another order


def _attention_ops(context) -> set:
    """Names of the aten ops a scaled-dot-product attention forward + backward ran under ``context``."""
    q, k, v = (torch.randn(2, 2, 5, 8, requires_grad=True) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with context:
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        out.float().sum().backward()
    return {e.key for e in prof.key_averages()}


def test_cpu_autocast_runs_attention_in_the_math_form():
    """bf16 autocast on CPU avoids the fused flash-attention kernel (its bf16 backward is slower than fp32's); fp32
    keeps PyTorch's own choice, so full-precision runs compute exactly as before."""
    bf16 = _attention_ops(Precision(CPU, torch.bfloat16).autocast())
    assert not any("flash" in name for name in bf16) and "aten::softmax" in bf16
    fp32 = _attention_ops(Precision(CPU).autocast())
    assert any("flash" in name for name in fp32)


def test_math_attention_under_autocast_matches_float64():
    """Same accuracy as the fused kernel: bf16 outputs and gradients within bf16 rounding of a float64 reference."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, dtype=torch.float64) for _ in range(3))

    def run(context, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        with context:
            lin = [torch.nn.functional.linear(t, torch.eye(16, dtype=dtype)) for t in leaves]  # cast by autocast
            out = nn.functional.scaled_dot_product_attention(*lin)
        out.double().pow(2).sum().backward()
        return [out.double()] + [t.grad.double() for t in leaves]

    got = run(Precision(CPU, torch.bfloat16).autocast(), torch.float32)
    assert got[0].dtype == torch.float64 and got[0].abs().max() > 0
    for a, b in zip(got, run(contextlib.nullcontext(), torch.float64)):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_count_flops_leaves_the_model_untouched():
    """thop's counting hooks and buffers stay on the profiled copy: the trained model runs no hook afterwards, and
    its state dict and outputs are unchanged."""
    from cgd.model import Model, count_flops

    torch.manual_seed(0)
    model = Model("resnet18", "SG", 64, 5).eval()
    x = torch.randn(2, 3, 32, 32)
    keys, before = list(model.state_dict()), model(x)[0]
    params, flops = count_flops(model, 32)
    assert params == sum(p.numel() for p in model.parameters()) and flops > 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x)[0], before, rtol=0, atol=0)


def test_precision_benchmark_notes_oversubscribed_threads(monkeypatch, capsys):
    """Threads plus load above the cores get a note (such timings stall on the scheduler); one thread, none."""
    from benchmarks import precision_benchmark as bench

    monkeypatch.setattr(bench.os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    bench.check_threads(2)
    assert "oversubscribed" in capsys.readouterr().out
    bench.check_threads(1)
    assert capsys.readouterr().out == ""
    with pytest.raises(UserError, match="--threads must be at least 1"):
        bench.main(bench.get_args_parser().parse_args(["--threads", "0", "--methods"]))
