"""Autotuned launches (``kernels._common.launch``): on a GPU the GEMM launchers time their
architecture's config list with ``triton.autotune`` and keep the fastest, per power-of-two bucket
of M and per (N, K, dtypes). Triton's interpreter cannot time, so here the autotuner's timer is
a fake one that makes the last config of each list the fastest, and the launchers configure for
sm_89 or sm_90 as on those GPUs: every config is offered, the winner runs (with its own NF4
decoding flags: SCALE_GROUP follows each config's BLOCK_K) and gives the reference's results, and
a call in a bucket already tuned times nothing."""

import pytest
import torch
from triton.runtime.autotuner import Autotuner

from helpers import assert_op_close, poisoned
from lowrank import nf4, ops
from lowrank.kernels import _common
from lowrank.kernels import lora_linear as lora_kernels
from lowrank.kernels._common import Target

N, K = 96, 128  # one BLOCK_N tile or two of every listed config, one to four BLOCK_K steps


@pytest.fixture
def fake_timer(monkeypatch):
    """Timings asked of the autotuner, as (kernel, config index); the last config is fastest."""
    timed = []

    def bench(tuner, *args, config, **meta):
        index = tuner.configs.index(config)
        timed.append((tuner.base_fn.__name__, index))
        return [1.0 if index == len(tuner.configs) - 1 else 2.0] * 3

    monkeypatch.setattr(Autotuner, "_bench", bench)
    monkeypatch.setattr(_common, "_TUNERS", {})
    return timed


@pytest.mark.parametrize("arch", (89, 90), ids=lambda cc: f"sm_{cc}")
def test_gemms_run_the_fastest_config_and_tune_once_per_bucket(arch, fake_timer, monkeypatch,
                                                               device):
    dtype = torch.float16  # the lists are for 16-bit operands (fp32 has one config)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, K, generator=gen).to(device, dtype)
    a = (torch.randn(16, K, generator=gen) / K**0.5).to(device, dtype)
    b = (torch.randn(N, 16, generator=gen) * 0.1).to(device, dtype)
    # Blocksize 128: SCALE_GROUP is then each config's own BLOCK_K (32, 64 or 128).
    packed, state = nf4.quantize((torch.randn(N, K, generator=gen) * 0.05).to(device, dtype),
                                 blocksize=128, double_quant=False)
    frozen = ops.FrozenWeight.of(packed, state)
    dense = nf4.dequantize(packed, state, dtype=torch.float32).double()
    target = Target(arch, _common.INTERPRETER_MULTIPROCESSORS)
    monkeypatch.setattr(_common, "target", lambda _: target)  # the launchers configure for it
    forward_configs = lora_kernels.forward_configs(target, dtype)
    backward_configs = lora_kernels.grad_input_configs(target, dtype, False)
    assert len(forward_configs) > 1 and len(backward_configs) > 1

    def forward(rows):
        s = (x[:rows].double() @ a.double().t()).to(dtype)
        y = poisoned((rows, N), dtype, device)
        lora_kernels.lora_forward(x[:rows], frozen.tensor, s, b, None, y, 0.5, frozen.nf4)
        expected = x[:rows].double() @ dense.t() + 0.5 * s.double() @ b.double().t()
        assert_op_close(y, expected, dtype, f"Y at M={rows}")
        grad_y = torch.randn(rows, N, generator=torch.Generator().manual_seed(4)).to(device, dtype)
        grad_s = (grad_y.double() @ b.double()).to(dtype)
        grad_x = poisoned((rows, K), dtype, device)
        lora_kernels.lora_grad_input(grad_y, frozen.tensor, grad_s, a, grad_x,
                                     torch.zeros(1, dtype=torch.int64, device=device), 0.0,
                                     frozen.nf4)
        assert_op_close(grad_x, grad_y.double() @ dense + grad_s.double() @ a.double(), dtype,
                        f"dX at M={rows}")

    forward(37)
    assert fake_timer == ([("_lora_forward_kernel", i) for i in range(len(forward_configs))]
                          + [("_lora_grad_input_kernel", i) for i in range(len(backward_configs))])
    winners = {tuner.base_fn.__name__: tuner.best_config.kwargs for tuner in _common._TUNERS.values()}
    assert winners["_lora_forward_kernel"]["BLOCK_K"] == forward_configs[-1]["BLOCK_K"]
    forward(33)  # the same bucket of M (33..64): nothing timed again
    assert len(fake_timer) == len(forward_configs) + len(backward_configs)
    forward(16)  # a new bucket: tuned again
    assert len(fake_timer) == 2 * (len(forward_configs) + len(backward_configs))

