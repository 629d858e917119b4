"""bench/search.py: the dry run end to end (both budget kinds, resumed), the table's figures, the BENCHMARKS.md block."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from conftest import load_bench_script, require_fashion_mnist
from distgan.config import load_config
from distgan.distributed import batch_plan
from test_configs import flatten

FIELDS = {"point", "overrides", "seed", "budget", "steps", "images", "train_wall_seconds", "probe", "loadavg_before",
          "loadavg_after", "figures", "commit", "machine", "date"}


def load_bench():
    return load_bench_script("search")


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dry_run_both_budgets_writes_lines_and_resumes(tmp_path, capsys):
    require_fashion_mnist()
    bench = load_bench()
    # one point per budget: each run is a few subprocesses that import torch (probe, train, eval)
    images = ["--dry-run", "--work", str(tmp_path), "--points", "hinge", "--seeds", "0", "--budget", "images=24"]
    # the wall clock probed at 2 threads (a demo's cores) while the run trains at 1
    seconds = ["--dry-run", "--work", str(tmp_path), "--points", "default", "--seeds", "0", "--budget", "seconds=30",
               "--probe-threads", "2"]
    assert bench.main(images) == 0
    assert bench.main([*seconds, "--table"]) == 0
    results = tmp_path / "search.jsonl"
    records = lines(results)
    assert sorted((r["budget"]["kind"], r["point"]) for r in records) == [("images", "hinge"), ("seconds", "default")]
    for r in records:
        assert FIELDS <= r.keys() and r["overrides"] == list(bench.POINTS[r["point"]])
        assert math.isfinite(r["figures"]["fd"]) and {"recall", "modes_covered"} <= r["figures"].keys()
        assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"] and r["machine"]["torch"]
        if r["budget"]["kind"] == "images":
            assert (r["steps"], r["images"], r["probe"]) == (3, 24, None)  # 24 images / batch 8
        else:  # 30 s at the probed seconds per step is far more than the dry run's cap of 4 steps
            assert r["probe"]["seconds_per_step"] > 0 and r["probe"]["threads"] == 2 and r["threads"] == 1
            assert r["budget"]["probe_threads"] == 2 and (tmp_path / "probes" / "fashion_mnist_baseline-threads2.json").is_file()
            assert r["steps"] == 4 and r["capped_by_max_steps"]
    table = capsys.readouterr().out
    assert "| default | - | seconds=30@2threads | 4 | 32 | 1 |" in table
    # a second invocation finds every run done: no probe, no training, no new line
    assert bench.main(images) == 0
    assert bench.main(seconds) == 0
    assert lines(results) == records
    assert capsys.readouterr().out.count("0 run(s) to do, 1 already") == 2
    # 32 images at batch 8 are the 4 steps the wall-clock run trained: its figures, not a second training
    same = ["--dry-run", "--work", str(tmp_path), "--points", "default", "--seeds", "0", "--budget", "images=32"]
    assert bench.main([*same, "--table"]) == 0
    again = lines(results)[-1]
    assert again["budget"]["kind"] == "images" and again["same_run_as"] == "seconds=30@2threads"
    assert (again["figures"], again["steps"], again["probe"]) == (records[1]["figures"], 4, None)
    assert not (tmp_path / "runs" / "fashion_mnist_baseline" / "images=32").exists()
    assert "| images=32 (the runs of seconds=30@2threads) | 4 | 32 | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--budget", "images=10", "--points", "nope"], "unknown point(s) nope"),
    (["--budget", "minutes=3"], "--budget 'minutes=3'"),
    (["--budget", "images=-5"], "--budget 'images=-5'"),
    (["--budget", "images=10", "--jobs", "99"], "--jobs 99 x --threads 1"),
    (["--budget", "images=10", "--probe-threads", "2"], "an image budget has no probes"),
    (["--budget", "default-time", "--probe-threads", "0"], "--probe-threads 0"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    bench = load_bench()
    assert bench.main([*argv, "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "data").exists()


def test_a_bad_override_fails_at_startup_with_the_config_error(tmp_path, capsys, monkeypatch):
    bench = load_bench()
    monkeypatch.setitem(bench.POINTS, "bad", ("generator.upsample=cubic",))
    assert bench.main(["--budget", "images=10", "--points", "default", "bad", "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "point bad:" in err and "generator.upsample" in err and err.count("\n") == 1
    assert not (tmp_path / "data").exists()


def test_every_point_is_a_valid_config_and_budgets_parse():
    bench = load_bench()
    configs = bench.point_configs("fashion_mnist_baseline", bench.POINTS, ())  # the search's base config
    assert configs["r1_g1_lazy4"].loss.penalty_interval == 4 and configs["upsample_nearest"].generator.upsample == "nearest"
    assert bench.images_per_step(configs["d_steps_2"]) == 128
    assert [bench.parse_budget(b).label for b in ("images=192000", "seconds=240", "seconds=2.5", "default-time")] == [
        "images=192000", "seconds=240", "seconds=2.5", "default-time"]


def record(point: str, seed: int, fd: float, budget: tuple = ("images", 192000.0)) -> dict:
    return {"point": point, "overrides": [] if point == "default" else [f"loss.kind={point}"], "base": "fashion_mnist",
            "seed": seed, "budget": {"kind": budget[0], "value": budget[1], "seconds": None}, "steps": 3000,
            "images": 192000, "train_wall_seconds": 100.0 + seed, "probe": None, "threads": 1, "jobs": 2,
            "n_eval": 5000, "figures": {"fd": fd, "recall": 0.1 * (seed + 1), "modes_covered": 10 - seed},
            "commit": "0123456789abcdef", "machine": {"cpu": "a CPU", "cores": 2, "torch": "2"},
            "date": f"2026-11-2{seed}T00:00:00"}


def test_table_means_spreads_order_and_marks():
    bench = load_bench()
    records = [record("default", 0, 20.0), record("default", 1, 21.0), record("hinge", 0, 10.0),
               record("hinge", 1, 12.0), record("hinge", 2, 14.0), record("minimax", 0, 30.0),
               record("least-squares", 0, 20.2), record("least-squares", 1, 20.4),
               record("default", 0, 50.0, ("seconds", 240.0)), record("wasserstein", 0, 40.0, ("seconds", 240.0))]
    table = bench.render_table(records)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| point")]
    assert [r.split(" | ")[0].strip("| *") for r in rows] == ["hinge", "least-squares", "default", "minimax",
                                                               "wasserstein", "default"]
    hinge, least_squares, default, minimax, lone, seconds = (r.split(" | ") for r in rows)
    assert hinge[0] == "| **hinge**" and hinge[6:11] == ["12.00 ± 2.00", "10.00, 12.00, 14.00", "0.200", "8", "101"]
    assert hinge[-1] == "yes (default) |" and hinge[2] == "images=192000" and hinge[5] == "3"
    assert lone[-1] == " |"  # a reference of one seed has no spread to beat
    assert default[6] == "20.50 ± 0.71" and default[-1] == " |"  # sample std of 20 and 21: 0.7071
    assert least_squares[0] == "| least-squares" and least_squares[-1] == " |"  # 20.3: lower, within the spread
    assert minimax[6] == "30.00" and seconds[2] == "seconds=240"
    assert "2026-11-20 to 2026-11-22" in table
    assert bench.mean_std([1e16, 1.0, -1e16]) == (pytest.approx(1 / 3), pytest.approx(1e16))
    assert "Not run yet" in bench.render_table([])


def test_one_seed_is_not_a_win_and_recipe_points_face_the_recipe():
    bench = load_bench()
    recipe = bench.RECIPE_POINT
    records = [record("default", 0, 50.0), record("default", 1, 52.0), record(recipe, 0, 20.0), record(recipe, 1, 22.0),
               record("recipe_hinge", 0, 18.0), record("recipe_hinge", 1, 18.4), record("recipe_minimax", 0, 16.0),
               record("recipe_wasserstein", 0, 20.5), record("hinge", 0, 40.0)]
    rows = {r.split(" | ")[0].strip("| *"): r for r in bench.render_table(records).splitlines()
            if r.startswith("| ") and not r.startswith("| point")}
    assert rows[recipe].endswith("| yes (default) |") and rows[recipe].startswith(f"| **{recipe}**")
    assert rows["recipe_hinge"].endswith(f"| yes ({recipe}) |") and rows["recipe_hinge"].startswith("| **")
    # one seed below the reference's spread: marked, not bold; 20.5 is within the recipe's 21 +- 1.4
    assert rows["recipe_minimax"].endswith(f"| 1 seed ({recipe}) |") and rows["recipe_minimax"].startswith("| recipe_")
    assert rows["recipe_wasserstein"].endswith("|  |") and rows["hinge"].endswith("| 1 seed (default) |")
    shipped = bench.DEFAULT_POINT  # the fifth round's points face the shipped default, itself a fourth-round point
    records += [record(shipped, 0, 15.0), record(shipped, 1, 15.2), record("shipped_hinge", 0, 14.0),
                record("shipped_hinge", 1, 14.2)]
    rows = {r.split(" | ")[0].strip("| *"): r for r in bench.render_table(records).splitlines()
            if r.startswith("| ") and not r.startswith("| point")}
    assert rows[shipped].endswith(f"| yes ({recipe}) |") and rows["shipped_hinge"].endswith(f"| yes ({shipped}) |")


def test_the_shipped_default_is_the_search_winner():
    """fashion_mnist.yaml (and mnist.yaml) train what the search measured: its base plus SHIPPED_POINT's overrides,
    every key that shapes G, D, their losses and optimizers, the batch and the EMA. The batch and the lrs compare as
    one process trains them (the point sets them through batch_per_process and lr_batch_scaling)."""
    bench = load_bench()
    searched_cfg = bench.point_configs("fashion_mnist_baseline", {"p": bench.POINTS[bench.SHIPPED_POINT]}, ())["p"]
    searched = flatten(searched_cfg)
    trained = ("generator.", "discriminator.", "loss.", "g_optim.", "d_optim.", "ema.", "augment.", "train.d_steps",
               "data.pad")
    as_trained = ("train.batch_size", "train.batch_per_process", "train.lr_batch_scaling", "g_optim.lr", "d_optim.lr")

    def one_process(cfg) -> tuple[int, float, float]:
        plan = batch_plan(cfg.train, 1)
        return plan.global_batch, cfg.g_optim.lr * plan.lr_factor, cfg.d_optim.lr * plan.lr_factor

    for name in ("fashion_mnist", "mnist"):
        cfg = load_config(name)
        shipped = flatten(cfg)
        differ = {k: (shipped[k], searched[k]) for k in searched
                  if k.startswith(trained) and k not in as_trained and shipped[k] != searched[k]}
        assert not differ, f"{name}.yaml is not the search's {bench.SHIPPED_POINT}: {differ}"
        assert one_process(cfg) == pytest.approx(one_process(searched_cfg), rel=1e-12), name
    assert one_process(searched_cfg) == pytest.approx((128, 1.6e-3, 1.6e-3), rel=1e-12)
    assert bench.DEFAULT_POINT in bench.POINTS and bench.SHIPPED_POINT in bench.POINTS


def test_benchmarks_md_block_is_the_generated_one():
    bench = load_bench()
    if not bench.RESULTS.is_file():
        pytest.skip("bench/results/search.jsonl does not exist yet: the search has not been run")
    assert bench.read_block(bench.MARKDOWN) == bench.render_table(bench.read_lines(bench.RESULTS)), (
        f"the search table in BENCHMARKS.md is not the one bench/results/search.jsonl gives: run {bench.TABLE_COMMAND}")


def test_same_compute_points_and_the_probe_median(tmp_path):
    bench = load_bench()
    assert bench.same_compute(bench.POINTS["hinge"]) and bench.same_compute(bench.POINTS["ttur_betas_0_0.9"])
    assert bench.same_compute(bench.POINTS["ema_hl_2.5"]) and bench.same_compute(())
    for name in ("r1_g1", "width_32", "batch_128", "d_steps_2", "upsample_nearest", "d_norm_none"):
        assert not bench.same_compute(bench.POINTS[name]), name
    # R1 at any weight, with either loss, is one probe; lazy R1 does other work
    r1 = {bench.compute_class(bench.POINTS[n]) for n in ("r1_g0.1", "r1_g1", "r1_g10", "hinge_r1_g1")}
    assert r1 == {("loss.penalty=r1",)}
    assert bench.compute_class(bench.POINTS["r1_g1_lazy4"]) == ("loss.penalty=r1", "loss.penalty_interval=4")
    # log lines every 10 steps of 64 images: 0.1 s/step in four intervals, one interval slowed 5x by contention
    metrics = tmp_path / "metrics.jsonl"
    rows = [(10, 640.0), (20, 640.0), (30, 128.0), (40, 640.0), (50, 640.0)]
    metrics.write_text("".join(json.dumps({"step": s, "images_seen": s * 64, "images_per_s": r}) + "\n"
                               for s, r in rows))
    assert bench.seconds_per_step(metrics, 10, 50) == pytest.approx(0.1)  # the mean would say 0.2
    assert bench.seconds_per_step(metrics, 20, 50) == pytest.approx(0.1)


def test_probe_threads_budget_is_its_own_budget():
    """Runs planned at 2-thread probes are not the runs planned at 1-thread probes: other label, other key, other
    run dir; lines written before the option existed (no probe_threads) keep their key and label."""
    bench = load_bench()
    assert bench.parse_budget("default-time", 2).label == "default-time@2threads"
    assert bench.parse_budget("default-time").label == "default-time"
    old = {"base": "b", "point": "p", "overrides": [], "seed": 0, "budget": {"kind": "default-time", "value": None}}
    new = {**old, "budget": {"kind": "default-time", "value": None, "probe_threads": None}}
    two = {**old, "budget": {"kind": "default-time", "value": None, "probe_threads": 2}}
    assert bench.run_key(old) == bench.run_key(new) != bench.run_key(two)
    assert bench.budget_label(old) == "default-time" and bench.budget_label(two) == "default-time@2threads"


def test_images_budget_counts_the_global_batch_of_batch_per_process():
    """A batch-size point (train.batch_per_process=512 on a reference batch of 32) trains 16x fewer steps than the
    default at the same images: the budget divides by the batch D really sees, not by train.batch_size."""
    bench = load_bench()
    configs = bench.point_configs("fashion_mnist_baseline", {n: bench.POINTS[n] for n in (
        bench.DEFAULT_POINT, "shipped_batch_512_lr_sqrt")}, ())
    assert bench.images_per_step(configs[bench.DEFAULT_POINT]) == 32
    assert bench.images_per_step(configs["shipped_batch_512_lr_sqrt"]) == 512


def test_a_run_capped_by_max_steps_has_its_own_dir(tmp_path):
    """A --max-steps run's plan.json must not be resumed by a later uncapped run of the same budget (it stopped
    an uncapped search at the cap's 1 step once)."""
    bench = load_bench()
    ctx = argparse.Namespace(work=tmp_path, base="fashion_mnist_baseline", budget=bench.parse_budget("seconds=248"),
                             extra=(), points={"p": ("train.d_steps=2",)})
    capped = bench.run_dir_of("p", 0, {"steps": 1, "capped_by_max_steps": True}, ctx)
    full = bench.run_dir_of("p", 0, {"steps": 15000}, ctx)
    assert capped != full and capped.parent == full.parent and capped.name.endswith("-max1-seed0")
