"""N processes train the same GAN as one process on the same global batches: the proof, in numbers.

Logic is proven in float64, where rounding (~1e-16) is far below anything a bug changes: the matrix
{no penalty, R1, WGAN-GP, lazy R1} x {BN in G, sync-BN in G, sync-BN in D}, plus a class-conditional R1 case
(labels drawn for the global batch like the latents) and plain BN in G on 6 samples per rank left to the default
train.small_bn_batch (switched to sync-batch, so it must equal one process), trains 20 steps with 2 gloo
processes through the real launcher and with 1 process; the synchronized cases agree to 1e-10, and a run
resumed on another process count agrees with the straight run to 1e-10. WGAN-GP through a batch-norm D
is refused by config.

Float32 asserts only what rounding cannot break on any CPU: ranks bit-identical (they all-reduce the same
bits and apply the same update), and the first step's gradients against one process within a derived bound.
A float32 comparison of weights after many Adam steps is NOT machine-independent: Adam divides each
gradient by its own running magnitude, so rounding noise on parameters whose true gradient is ~0 (biases
before a norm) becomes a full-size step whose sign depends on the CPU's summation order (measured: 0.039
relative on one EPYC, < 1e-5 on another).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.equivalence_run import CASES
from tests.distributed.launching import cpu_env, launch

pytestmark = [pytest.mark.distributed]
SCRIPT = "tests/distributed/equivalence_run.py"
SYNCED = ["none.syncbn-g", "none.syncbn-d", "r1.syncbn-d", "wgan-gp.syncbn-g"]


def _load(out, case, world, rank, stem=""):
    return load_file(str(out / case / f"{stem}world{world}-rank{rank}.safetensors"))


def _max_rel(a: dict, b: dict) -> float:
    """The largest per-tensor relative difference ||a - b|| / ||b||, in float64."""
    worst = 0.0
    for key, x in a.items():
        if not x.is_floating_point():
            continue
        y = b[key]
        worst = max(worst, ((x.double() - y.double()).norm() / (y.double().norm() + 1e-12)).item())
    return worst


def _rel_whole(a: dict, b: dict, prefix: str) -> float:
    """||a - b|| / ||b|| over all of one module's tensors together, in float64."""
    keys = [k for k in b if k.startswith(prefix + ".")]
    diff = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys)
    return float((diff / sum((b[k].double() ** 2).sum() for k in keys)).sqrt())


@pytest.fixture(scope="module")
def float64_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("eq64")
    env = cpu_env(EQ_DTYPE="float64")
    launch([SCRIPT, str(out)], processes=2, timeout=420, env=env)
    launch([SCRIPT, str(out)], processes=1, timeout=420, env=env)
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", sorted(CASES))
def test_ranks_identical_and_equal_to_one_process(float64_runs, case):
    r0, r1 = _load(float64_runs, case, 2, 0), _load(float64_runs, case, 2, 1)
    one = _load(float64_runs, case, 1, 0)
    assert set(r0) == set(one) and any(k.startswith("G_ema.") for k in r0)
    per_rank_bn = case.endswith("bn-g") and not case.endswith("syncbn-g")
    for key in r0:  # parameters and buffers identical across ranks, bit for bit (plain BN's running statistics
        assert torch.equal(r0[key], r1[key]), f"{case}: {key} differs across ranks"  # are averaged over ranks)
    if per_rank_bn:
        # Plain BN normalises each rank's half-batch separately: not the one-process computation. This is
        # why sync-batch exists; assert the difference is real so the synchronized cases below mean something.
        assert _max_rel(r0, one) > 1e-3
    else:
        assert _max_rel(r0, one) < 1e-10, f"{case}: 2 processes differ from 1 process"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_across_process_counts_gives_the_straight_weights(float64_runs, first, second):
    """10 steps on one process count, resumed to 20 on the other: the weights of 20 straight steps (float64)."""
    env = cpu_env(EQ_DTYPE="float64")
    cases = ["r1.syncbn-d", "none.syncbn-g"]
    tag = f"resume{first}to{second}"
    launch([SCRIPT, str(float64_runs), *cases, "--steps", "10", "--tag", tag], processes=first, timeout=300, env=env)
    launch([SCRIPT, str(float64_runs), *cases, "--steps", "20", "--tag", tag, "--resume", "auto"], processes=second,
           timeout=300, env=env)
    for case in cases:
        resumed = _load(float64_runs, case, second, 0, stem=tag)
        straight = _load(float64_runs, case, 1, 0)
        assert _max_rel(resumed, straight) < 1e-10, f"{case}: resumed {first}->{second} differs from 20 straight steps"


@pytest.mark.timeout(600)
def test_float32_ranks_bit_identical(tmp_path):
    """20 float32 steps on 2 ranks: every parameter and G_ema buffer identical bit for bit across ranks."""
    launch([SCRIPT, str(tmp_path), "none.syncbn-g", "r1.syncbn-d"], processes=2, timeout=300)
    for case in ("none.syncbn-g", "r1.syncbn-d"):
        r0, r1 = _load(tmp_path, case, 2, 0), _load(tmp_path, case, 2, 1)
        assert r0.keys() == r1.keys()
        assert all(torch.equal(r0[k], r1[k]) for k in r0), f"{case}: float32 ranks differ"


# Bound for float32 first-step gradients, 2 processes against 1. Both compute the same sums over the same
# batch, grouped differently (two half-batch sums all-reduced, against one sum). A sum of n float32 terms
# regrouped moves by at most gamma_n * sum|terms| with gamma_n ~ n * 2^-24 (Higham, Accuracy and Stability,
# ch. 4). The longest reduction here is a conv weight gradient over batch x positions = 12 x 14 x 14 = 2352
# terms: gamma_n = 1.4e-4; a forward and backward pass chain about 6 such reductions (R1 adds a double
# backward), so 1e-3 for the whole-module relative difference holds without assuming any summation order.
# Measured here: 3e-7 to 3e-6. A missing all-reduce or a wrong slice of the global batch gives O(1).
FLOAT32_FIRST_STEP_BOUND = 1e-3


@pytest.mark.timeout(600)
def test_float32_first_step_gradients_match_one_process(tmp_path):
    launch([SCRIPT, str(tmp_path), *SYNCED, "--grads"], processes=2, timeout=300)
    launch([SCRIPT, str(tmp_path), *SYNCED, "--grads"], processes=1, timeout=300)
    for case in SYNCED:
        r0, r1 = _load(tmp_path, case, 2, 0, "grads-"), _load(tmp_path, case, 2, 1, "grads-")
        one = _load(tmp_path, case, 1, 0, "grads-")
        assert r0.keys() == one.keys() and any(k.startswith("D.") for k in one) and any(k.startswith("G.") for k in one)
        assert all(torch.equal(r0[k], r1[k]) for k in r0), f"{case}: ranks received different gradients"
        for module in ("D", "G"):
            rel = _rel_whole(r0, one, module)
            print(f"{case} {module}: first-step gradient relative difference {rel:.2e}")
            assert rel < FLOAT32_FIRST_STEP_BOUND, f"{case}: {module} gradients differ from one process by {rel:.2e}"


def test_wgan_gp_through_batch_norm_d_is_refused():
    from distgan.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="batch norm mixes samples"):
        load_config("smoke", ["loss.penalty=wgan-gp", "discriminator.norm=sync-batch"])
