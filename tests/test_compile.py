"""train.compile: compiled G and D (torch.compile, inductor, as the trainer's ``Module.compile()``) train the same
math as eager, spectral norm's in-place power iteration and the joint real+fake D forward included.

Float64 so that the tolerance follows from the arithmetic: inductor fuses and reorders sums (at most ~512 terms per
dot product here, each rounding ~1.1e-16 relative), so losses and parameters after 3 Adam steps (lr 2e-4) agree to
far better than 1e-9 relative; a wrong graph (a missed power iteration, a stale sigma, a wrong half of the joint
batch) moves them by 1e-6 or more.
"""
from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from distgan.build import check_cuda_graphs, uses_cuda_graphs
from distgan.config import ConfigError, DiscriminatorConfig, GeneratorConfig, LossConfig, load_config
from distgan.nn import build_discriminator, build_generator
from distgan.objective import GANObjective
from distgan.trainer import Trainer
from tests.distributed.support import MemorySource


def train(D, G, steps: int) -> list[tuple[float, float]]:
    objective = GANObjective(LossConfig(kind="hinge"))
    opt_d, opt_g = torch.optim.Adam(D.parameters(), 2e-4), torch.optim.Adam(G.parameters(), 2e-4)
    figures = []
    for i in range(steps):
        gen = torch.Generator().manual_seed(i)
        real = torch.rand(8, 1, 28, 28, generator=gen, dtype=torch.float64) * 2 - 1
        z = torch.randn(8, 8, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            fake = G(z)
        loss_d, _ = objective.discriminator(D, real, fake, regularize=False, alpha=None, autocast=nullcontext,
                                            grad_scale=1.0)
        loss_d.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        D.requires_grad_(False)
        loss_g, _ = objective.generator(D, G, z, nullcontext)
        loss_g.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        D.requires_grad_(True)
        figures.append((loss_d.item(), loss_g.item()))
    return figures


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_training_is_eager_training():
    torch.manual_seed(0)
    D = build_discriminator(DiscriminatorConfig(arch="dcgan", width=8, max_width=32, norm="spectral"), 28, 1).double()
    G = build_generator(GeneratorConfig(arch="dcgan", width=8, max_width=32, z_dim=8), 28, 1).double()
    D_c, G_c = copy.deepcopy(D), copy.deepcopy(G)
    D_c.compile()
    G_c.compile()
    torch._dynamo.reset()
    eager, compiled = train(D, G, 3), train(D_c, G_c, 3)
    torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=0)
    for net, net_c in ((D, D_c), (G, G_c)):  # parameters, BN statistics and spectral norm's u, v
        for (name, x), y in zip(net.state_dict().items(), net_c.state_dict().values()):
            torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-12, msg=name)


def trainer_weights(run_dir, *overrides: str) -> dict[str, torch.Tensor]:
    cfg = load_config("smoke", [f"run.dir={run_dir}", "train.steps=3", "log.every=1000", "log.sample_every=1000",
                                "checkpoint.every=1000", "log.gif=false", "train.cpu_threads=1",
                                "discriminator.norm=spectral", *overrides])
    trainer = Trainer(cfg, source=MemorySource())
    trainer.fit()
    weights = {f"{prefix}.{key}": value.detach().clone()
               for prefix, module in (("G", trainer.G_plain), ("D", trainer.D_plain), ("G_ema", trainer.ema.model))
               for key, value in module.state_dict().items()}
    trainer.close()
    return weights


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_trainer_with_a_cuda_graph_mode_trains_eager_numbers(tmp_path, caplog, monkeypatch):
    """train.compile with train.compile_mode=reduce-overhead through the Trainer: each step marked for the cudagraph
    trees, and (on this CPU, where inductor compiles without graphs, as the log says) eager's numbers after 3 steps,
    G's batch norm statistics, D's spectral norm vectors and G_ema included. Float64: bound as above."""
    marks = []
    mark = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: (marks.append(1), mark())[1])
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        eager = trainer_weights(tmp_path / "eager")
        assert not marks
        torch._dynamo.reset()
        with caplog.at_level(logging.INFO, logger="distgan.build"):
            graphs = trainer_weights(tmp_path / "graphs", "train.compile=true", "train.compile_mode=reduce-overhead")
    finally:
        torch.set_default_dtype(dtype)
        torch._dynamo.reset()
    assert len(marks) == 3 and "CUDA graphs need a CUDA device" in caplog.text
    assert set(graphs) == set(eager)
    for key, value in eager.items():
        torch.testing.assert_close(graphs[key], value, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("mode,graphs", [("reduce-overhead", True), ("max-autotune", True),
                                         ("max-autotune-no-cudagraphs", False)])
def test_compile_mode_refusals_are_named(mode, graphs):
    with pytest.raises(ConfigError, match=rf"train.compile_mode={mode} without train.compile=true"):
        load_config("smoke", [f"train.compile_mode={mode}"])
    cfg = load_config("smoke", ["train.compile=true", f"train.compile_mode={mode}"])
    assert uses_cuda_graphs(cfg) == graphs and not uses_cuda_graphs(load_config("smoke", ["train.compile=true"]))
    two_ranks = SimpleNamespace(num_processes=2, device=torch.device("cuda"), is_main_process=True)
    if graphs:
        with pytest.raises(ConfigError, match=rf"{mode} with sync-batch norm on 2 processes: .*compile_mode=default"):
            check_cuda_graphs(cfg, two_ranks, ("sync-batch", "spectral"))
    else:
        check_cuda_graphs(cfg, two_ranks, ("sync-batch", "spectral"))  # no graphs: the all-reduce runs as eager's
    check_cuda_graphs(cfg, two_ranks, ("batch", "spectral"))  # plain batch norm: nothing to all-reduce in a graph
    check_cuda_graphs(load_config("smoke", ["train.compile=true"]), two_ranks, ("sync-batch", "spectral"))
