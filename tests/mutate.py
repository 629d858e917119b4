"""A mutation pass: break the code in known ways, one at a time, and check that the tests that guard each break fail.

    python tests/mutate.py            # every mutation (a few minutes on 2 cores); or python -m tests.mutate
    python tests/mutate.py --only resume-from-batch-0 --only penalty-times-zero
    python tests/mutate.py --list

It copies the working tree (git's tracked and untracked-not-ignored files) to a temporary folder, checks that
the guarding tests pass there unmutated, then for each mutation replaces one exact snippet of one file, runs
``python -m pytest -x -q TESTS`` in the copy (PYTHONPATH at the copy) under a timeout, and restores the file.
It prints a Markdown table (caught/survived per mutation) and exits 1 when a mutation survived, 2 when a
snippet is not found exactly once (the list must follow the code, never rot silently) or the unmutated tests
fail. Not collected by pytest (no test_ prefix), not run in CI; docs/MUTATIONS.md records its last result.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300  # per mutation; a hang counts as caught (pytest-timeout or this limit ends it), and is marked so


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest ids that must fail once the mutation is applied


OBJ, E2E, EVERY = "tests/test_objective.py", "tests/test_train_e2e.py", "tests/test_every_option.py"
PENALTY_TIMES_ZERO = ("distgan/objective.py", "return loss + self.penalty_weight * value, figures",
                      "return loss + 0 * self.penalty_weight * value, figures")
MUTATIONS = [
    # one mutation per guarding test: pytest -x stops at the first failure, so each test must catch it on its own
    *(Mutation(name, *PENALTY_TIMES_ZERO, (test,)) for name, test in (
        ("penalty-times-zero", f"{OBJ}::test_d_loss_and_gradient_carry_the_weighted_penalty"),
        ("penalty-times-zero-trainer", f"{OBJ}::test_one_trainer_step_moves_d_by_the_weighted_penalty_gradient"),
        ("penalty-times-zero-every-option", f"{EVERY}::test_option_trains[hinge-r1]"))),
    Mutation("lazy-interval-factor-dropped", "distgan/losses.py", "return weight * PENALTIES[kind].factor * interval",
             "return weight * PENALTIES[kind].factor",
             (f"{OBJ}::test_one_trainer_step_moves_d_by_the_weighted_penalty_gradient[r1-4]",)),
    Mutation("r1-factor-gamma-not-half", "distgan/losses.py", 'Penalty("real", 0.5)', 'Penalty("real", 1.0)',
             (f"{OBJ}::test_d_loss_and_gradient_carry_the_weighted_penalty[non-saturating-r1-every-step-plain]",)),
    Mutation("wgan-gp-interpolates-are-the-fakes", "distgan/losses.py",
             "(alpha * real.detach() + (1.0 - alpha) * fake.detach())", "(0 * alpha * real.detach() + fake.detach())",
             (f"{OBJ}::test_d_loss_and_gradient_carry_the_weighted_penalty[hinge-wgan-gp-every-step-plain]",)),
    Mutation("resume-from-batch-0", "distgan/trainer.py", "self.cfg.run.seed,\n                                   "
             "self.state.batches_consumed)", "self.cfg.run.seed,\n                                   0)",
             (f"{EVERY}::test_dropout_run_resumes_where_it_stopped",)),
    Mutation("optimizer-step-skipped", "distgan/precision.py", "        try:\n            optimizer.step()",
             "        try:\n            pass", (f"{EVERY}::test_option_trains[non-saturating-none]",)),
    Mutation("d-loss-sign-flipped", "distgan/losses.py", 'Loss(lambda real, fake: fake.mean() - real.mean(),',
             'Loss(lambda real, fake: real.mean() - fake.mean(),',
             (f"{EVERY}::test_option_trains[wasserstein-r1]",)),
    Mutation("g-loss-sign-flipped", "distgan/losses.py", '(Loss(_d_bce, lambda fake: F.softplus(-fake).mean()))',
             '(Loss(_d_bce, lambda fake: F.softplus(fake).mean()))',
             (f"{EVERY}::test_option_trains[non-saturating-none]",)),
    Mutation("ema-update-dropped", "distgan/ema.py", "torch._foreach_copy_(targets, torch._foreach_lerp(",
             "(targets, torch._foreach_lerp(", (f"{EVERY}::test_option_trains[ema-fixed-decay]",)),
    Mutation("d-steps-ignored", "distgan/trainer.py", "repeats=cfg.train.d_steps,", "repeats=1,",
             (f"{EVERY}::test_option_trains[d-steps-3]",)),
    Mutation("syncbn-all-reduce-dropped", "distgan/nn/syncbn.py",
             "stats = all_reduce_sum(stats, self.process_group)", "stats = stats",
             ("tests/test_syncbn.py::test_sync_batchnorm_equals_global_batchnorm[2-ranks]",)),
    Mutation("clip-not-applied", "distgan/precision.py", "torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)",
             "pass", (f"{EVERY}::test_option_trains[max-grad-norm]",)),
    Mutation("hflip-not-applied", "distgan/data/stream.py", "images[flip] = images[flip][..., ::-1]",
             "images[flip] = images[flip]", ("tests/test_data_pipeline.py::test_hflip_mirrors_about_half",)),
    Mutation("g-ema-not-checkpointed", "distgan/trainer.py", 'modules["G_ema"] = self.ema.model', "pass",
             (f"{EVERY}::test_option_trains[minimax-none]",)),
    Mutation("conditional-d-ignores-labels", "distgan/nn/conditional.py",
             "return self.linear(h)[:, 0] + (self.embed(y).to(h.dtype) * h).sum(dim=1)",
             "return self.linear(h)[:, 0]",
             ("tests/test_conditional.py::test_projection_head_and_embedding_in_float64",)),
    Mutation("pad-value-not-background", "distgan/data/stream.py", "(pad, pad, pad, pad), value=BACKGROUND)",
             "(pad, pad, pad, pad), value=0.0)", (f"{EVERY}::test_option_trains[pad-28-to-32]",)),
]


def copy_tree(dest: Path) -> None:
    """The files git would commit (tracked, and untracked but not ignored), at their working-tree content."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    """(exit status, output tail, seconds) of pytest on ``tests`` in ``root``; 124 on timeout."""
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, WANDB_MODE="offline")
    env.pop("CI", None)
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                              env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, (proc.stdout + proc.stderr)[-20000:], time.perf_counter() - started
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s", time.perf_counter() - started


def first_failure(output: str) -> str:
    """The first exception line of pytest's report (``E   AssertionError: ...``), cut to 100 characters."""
    found = re.search(r"^E +(\w*(?:Error|Exception|Failed)\b.*)$", output, re.M)
    found = found or re.search(r"^E +(.+)$", output, re.M)
    return found.group(1).replace("|", "/")[:100] if found else ""


def check_snippets(mutations: list[Mutation]) -> list[str]:
    """A line per mutation whose original text is not in its file exactly once."""
    problems = []
    for m in mutations:
        path = REPO / m.path
        count = path.read_text().count(m.original) if path.is_file() else 0
        if count != 1:
            problems.append(f"{m.name}: {m.path} holds the original snippet {count} times (must be once): "
                            f"{m.original!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", default=[], help="run this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per mutation's tests")
    args = parser.parse_args(argv)
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"unknown mutation(s) {sorted(unknown)}; --list shows them", file=sys.stderr)
        return 2
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path}: {m.original!r} -> {m.replacement!r}\n    {' '.join(m.tests)}")
        return 0
    problems = check_snippets(chosen)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    guards = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="distgan-mutate-") as tmp:
        root = Path(tmp)
        copy_tree(root)
        code, out, seconds = run_tests(root, guards, args.timeout * 2)
        if code != 0:
            print(f"the guarding tests fail WITHOUT any mutation ({seconds:.0f} s); fix that first:\n{out[-3000:]}",
                  file=sys.stderr)
            return 2
        print(f"unmutated: {len(guards)} guarding tests pass ({seconds:.0f} s)\n")
        print("| mutation | file | result | s | guarding tests | first failure |\n|---|---|---|---|---|---|")
        survived = []
        for m in chosen:
            target = root / m.path
            original = target.read_text()
            target.write_text(original.replace(m.original, m.replacement, 1))
            try:
                code, out, seconds = run_tests(root, m.tests, args.timeout)
            finally:
                target.write_text(original)
            if code in (2, 3, 4, 5):  # interrupted, internal error, usage error, no tests collected: not a catch
                print(f"{m.name}: pytest exit {code} (a test id or the run is broken, not a catch):\n{out[-3000:]}",
                      file=sys.stderr)
                return 2
            result = "caught" if code != 0 else "SURVIVED"
            if code == 124:
                result = "caught (timeout)"
            if code == 0:
                survived.append(m.name)
            tests = ", ".join(t.replace("tests/", "") for t in m.tests)
            print(f"| {m.name} | {m.path} | {result} | {seconds:.0f} | {tests} | {first_failure(out)} |", flush=True)
    print(f"\n{len(chosen) - len(survived)} of {len(chosen)} mutations caught" +
          (f"; SURVIVED: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
