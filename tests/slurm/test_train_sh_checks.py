"""slurm/train.sh's checks before it launches anything: environment values, the job name, the run folder,
the nodes' GPU and CPU counts, the launcher's config. Fast: no cluster. train.sh runs under bash with
the variables sbatch would set and stand-ins for ``srun`` and ``scontrol`` on PATH; the stand-in srun
prints the per-node report train.sh asks for, and for the training step writes down its arguments
(and, like a finished training, the export in the run folder it was given last).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "slurm" / "train.sh"

FAKE_SRUN = """\
#!/bin/bash
# Stand-in srun: the per-node report (PROBE, one node per line; PROBE=run: train.sh's own probe, run here as on
# one node), or the training step (args saved).
if [[ $PROBE == run && " $* " != *" accelerate launch "* ]]; then
    while [[ $1 != bash ]]; do shift; done
    exec "$@"
fi
if [[ " $* " == *" accelerate launch "* ]]; then
    printf '%s\\n' "$@" > "$STUB_DIR/launch.args"
    last=${@: -1}
    mkdir -p "${last#run.dir=}"
    [[ -n ${STUB_NO_EXPORT:-} ]] || echo exported > "${last#run.dir=}/generator_ema.safetensors"
    exit "${STUB_EXIT:-0}"
fi
printf '%b\\n' "$PROBE"
"""
FAKE_SCONTROL = """\
#!/bin/bash
case "$1 $2" in
    "show hostnames") echo n1; echo n2 ;;
    "show node") echo "NodeName=$3 NodeAddr=127.0.0.1 Port=1" ;;
esac
"""


@pytest.fixture
def run_train_sh(tmp_path: Path):
    """Run train.sh as sbatch would start it, from ``tmp_path/submit``; returns (CompletedProcess, stub folder)."""
    stubs, submit = tmp_path / "bin", tmp_path / "submit"
    stubs.mkdir()
    submit.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)

    def run(*overrides: str, probe: str = "n1 0 4\nn2 0 4", **env: str) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RUN_DIR", "GPUS_", "MASTER_"))}
        base.update(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO), STUB_DIR=str(stubs),
                    PROBE=probe, CONFIG="smoke", SLURM_JOB_ID="14321", SLURM_JOB_NAME="distgan",
                    SLURM_SUBMIT_DIR=str(submit), SLURM_JOB_NUM_NODES="2", SLURM_CPUS_PER_TASK="4",
                    SLURM_JOB_NODELIST="n[1-2]")
        base.update(env)
        return subprocess.run(["bash", str(TRAIN_SH), *overrides], cwd=submit, env=base, capture_output=True,
                              text=True, timeout=60, start_new_session=True)  # its own group: "kill 0" below

    run.stubs, run.submit = stubs, submit  # type: ignore[attr-defined]
    return run


def launch_args(stubs: Path) -> list[str]:
    return (stubs / "launch.args").read_text().splitlines()


def assert_refused(done: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, one line on stderr that starts with train.sh and names ``words``; nothing launched."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.sh: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("name", ["GPUS_PER_NODE", "PROCS_PER_NODE", "THREADS_PER_PROC", "MASTER_PORT"])
def test_environment_numbers_are_checked_not_evaluated(run_train_sh, tmp_path, name):
    marker = tmp_path / "injected"
    value = f"a[$(touch {marker})]"  # bash arithmetic would run the command substitution
    done = run_train_sh(**{name: value})
    assert_refused(done, f"{name}='{value}'", "whole number")
    assert not marker.exists(), "train.sh evaluated the value as a bash expression"
    assert not (run_train_sh.stubs / "launch.args").exists()
    assert_refused(run_train_sh(**{name: "99999"}), f"{name}='99999'")  # out of range


@pytest.mark.parametrize("job_name", ["../../etc", "a/b", ".hidden", "a b", "x$(id)"])
def test_job_names_that_are_not_plain_folder_names_are_refused(run_train_sh, job_name):
    assert_refused(run_train_sh(SLURM_JOB_NAME=job_name), f"job name '{job_name}'", "--job-name=")
    assert not (run_train_sh.submit / "runs").exists()


def test_a_run_dir_override_becomes_the_folder_train_sh_watches(run_train_sh):
    done = run_train_sh("train.steps=3", "run.dir=runs/mine")
    assert done.returncode == 0, done.stderr
    run_dir = run_train_sh.submit / "runs" / "mine"
    args = launch_args(run_train_sh.stubs)
    assert args[-1] == f"run.dir={run_dir}"  # given last: training takes it over the user's relative one
    assert f"run dir {run_dir}" in done.stdout
    assert f"training finished; run dir {run_dir}" in done.stdout, done.stdout
    assert sorted(p.name for p in (run_train_sh.submit / "runs").iterdir()) == ["mine"]


def test_default_run_dir_is_the_job_name_and_id(run_train_sh):
    done = run_train_sh("train.steps=3")
    assert done.returncode == 0, done.stderr
    assert launch_args(run_train_sh.stubs)[-1] == f"run.dir={run_train_sh.submit / 'runs' / 'distgan-14321'}"


def test_run_dir_and_a_different_override_are_refused(run_train_sh):
    done = run_train_sh("run.dir=runs/other", RUN_DIR="runs/mine")
    assert_refused(done, "RUN_DIR=runs/mine", "run.dir=runs/other", "only one")
    assert run_train_sh("run.dir=runs/mine", RUN_DIR="runs/mine").returncode == 0  # the same folder: fine


def test_a_bad_config_override_is_one_line_before_launch(run_train_sh):
    assert_refused(run_train_sh("train.stepz=3"), "train.stepz")
    assert not (run_train_sh.stubs / "launch.args").exists()


def test_nodes_with_different_gpu_counts_are_refused(run_train_sh):
    done = run_train_sh(probe="n1 8 64\nn2 4 64")
    assert_refused(done, "different GPU counts", "n1: 8 GPU(s)", "n2: 4 GPU(s)", "GPUS_PER_NODE=4")
    done = run_train_sh(probe="n1 8 64\nn2 4 64", GPUS_PER_NODE="4", SLURM_CPUS_PER_TASK="64")
    assert done.returncode == 0, done.stderr  # the smaller count, chosen by the user: 4 processes on each
    args = launch_args(run_train_sh.stubs)
    assert args[args.index("--num_processes") + 1] == "8" and "--multi_gpu" in args
    assert_refused(run_train_sh(probe="n1 8 64\nn2 4 64", GPUS_PER_NODE="8"), "GPUS_PER_NODE=8", "fewer")


def test_fewer_cpus_than_processes_are_refused(run_train_sh):
    done = run_train_sh(probe="n1 8 2\nn2 8 2", SLURM_CPUS_PER_TASK="2")
    assert_refused(done, "2 CPU(s) per node for 8 training processes", "--cpus-per-task=8")
    done = run_train_sh("data.num_workers=2", probe="n1 8 8\nn2 8 8", SLURM_CPUS_PER_TASK="8")
    assert done.returncode == 0, done.stderr  # a CPU per process, none for the data workers: a warning
    assert "warning: 8 CPU(s) per node for 8 process(es) x (1 + 2 data workers)" in done.stdout
    assert "--cpus-per-task=24" in done.stdout


def test_an_exit_without_export_or_signal_is_not_called_a_stop_on_request(run_train_sh):
    """The line train.sh used to print when training wrote elsewhere: 'stopped on request at checkpoint none'."""
    done = run_train_sh(STUB_NO_EXPORT="1")
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert "training exited without exporting" in last and "without a signal" in last, last
    assert "stopped on request" not in done.stdout


# Stand-in sinfo: the first call is hit by the TERM slurmctld sends every process of the job when a node dies
# (the subshell of $(down_nodes) dies of it); later calls, from train.sh's trap, report n2 down.
FAKE_SINFO = """\
#!/bin/bash
if [[ ! -e $STUB_DIR/sinfo.called ]]; then
    touch "$STUB_DIR/sinfo.called"
    kill -TERM 0
    sleep 5
fi
printf 'n1 idle\\nn2 down*\\n'
"""


def test_a_node_failure_seen_during_the_last_check_is_not_called_not_requeued(run_train_sh):
    """srun fails as a node dies, and slurmctld's TERM lands while train.sh asks sinfo which nodes are down:
    the line is the node failure's (Slurm requeues), never 'stopped by SIGTERM ... not requeued'."""
    (run_train_sh.stubs / "sinfo").write_text(FAKE_SINFO)
    (run_train_sh.stubs / "sinfo").chmod(0o755)
    done = run_train_sh(STUB_NO_EXPORT="1", STUB_EXIT="1")
    assert (run_train_sh.stubs / "sinfo.called").exists(), done.stdout
    assert "got SIGTERM" in done.stdout and "a node of this job failed (n2: down*)" in done.stdout, done.stdout
    assert "not requeued" not in done.stdout.lower(), done.stdout


def test_launch_is_explicit_c10d_rendezvous_on_a_port_below_the_ephemeral_range(run_train_sh, tmp_path):
    # a user's default accelerate config must not reach the job: it is never read
    hf = tmp_path / "hf" / "accelerate"
    hf.mkdir(parents=True)
    (hf / "default_config.yaml").write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n"
                                            "gpu_ids: '0'\ndebug: true\n")
    done = run_train_sh(HF_HOME=str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    args = launch_args(run_train_sh.stubs)
    config = Path(args[args.index("--config_file") + 1])
    assert config.parent == run_train_sh.submit / "logs" and "gpu_ids: all" in config.read_text()
    assert args[args.index("--rdzv_backend") + 1] == "c10d"
    port = int(args[args.index("--main_process_port") + 1])
    assert port == 20000 + 14321 % 10000 == 24321  # not 34321 (% 20000): ephemeral
    low, _high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert port < low
    # the store runs in the batch shell for the whole step: no launcher hosts it, none checks its port
    assert "exec accelerate launch --machine_rank \"$(( ${SLURM_NNODES:-1} > 1 ))\" --rdzv_conf is_host=0" in " ".join(args), shlex.join(args)
    assert re.search(r"main 127\.0\.0\.1:24321", done.stdout)


def test_the_log_folder_of_sbatch_output_is_in_the_repository():
    """Slurm does not create the --output folder (a job fails at launch without it): a fresh clone must have it."""
    output = re.search(r"^#SBATCH --output=(\S+)$", TRAIN_SH.read_text(), re.M).group(1)
    folder = str(Path(output).parent)
    tracked = subprocess.run(["git", "ls-files", "--", folder], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:  # not a git checkout (an sdist, a copy): the folder itself must be there
        assert (REPO / folder).is_dir()
        return
    assert tracked.stdout.split() == [f"{folder}/.gitignore"], "train.sh's log folder is not in the repository"
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/distgan-1.out"], cwd=REPO)
    assert ignored.returncode == 0, "job logs would show up as untracked files"


FAKE_NVIDIA_SMI = """\
#!/bin/bash
# Stand-in nvidia-smi: a node with 8 GPUs of compute capability $STUB_CAP (train.sh must not count them with -L)
if [[ $1 == -L ]]; then for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: stand-in"; done; exit 0; fi
for i in 0 1 2 3 4 5 6 7; do echo "$STUB_CAP"; done
"""


@pytest.mark.parametrize("env, procs, precision, affinity", [
    ({"CUDA_VISIBLE_DEVICES": "0,1,2", "STUB_CAP": "9.0"}, 3, "bf16", True),  # the job's 3 GPUs of the node's 8; H100
    ({"SLURM_GPUS_ON_NODE": "2", "STUB_CAP": "7.0"}, 2, "no", True),  # V100: no bf16 units
    ({"SLURM_GPUS_ON_NODE": "2", "STUB_CAP": "8.0", "MIXED_PRECISION": "fp16"}, 2, "fp16", True),  # the user's choice
    ({"STUB_CAP": "9.0"}, 1, "no", False),  # a CPU job: nvidia-smi's GPUs are not the job's
], ids=["visible-devices-bf16", "gres-no-bf16", "asked-fp16", "cpu"])
def test_gpus_precision_and_affinity_come_from_the_job(run_train_sh, env, procs, precision, affinity):
    nvidia_smi = run_train_sh.stubs / "nvidia-smi"
    nvidia_smi.write_text(FAKE_NVIDIA_SMI)
    nvidia_smi.chmod(0o755)
    done = run_train_sh("train.steps=3", probe="run", SLURMD_NODENAME="n1", SLURM_CPUS_ON_NODE="4",
                        SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="n1", **env)
    assert done.returncode == 0, done.stderr
    args = launch_args(run_train_sh.stubs)
    assert args[args.index("--num_processes") + 1] == str(procs)
    assert args[args.index("--mixed_precision") + 1] == precision
    assert ("--enable_cpu_affinity" in args) == affinity


def test_a_config_that_names_its_precision_keeps_it(run_train_sh):
    """bf16 GPUs, but the config says train.mixed_precision=no: the launcher asks for nothing (no conflict)."""
    nvidia_smi = run_train_sh.stubs / "nvidia-smi"
    nvidia_smi.write_text(FAKE_NVIDIA_SMI)
    nvidia_smi.chmod(0o755)
    done = run_train_sh("train.steps=3", "train.mixed_precision=no", probe="run", SLURMD_NODENAME="n1",
                        SLURM_GPUS_ON_NODE="1", STUB_CAP="9.0", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="n1")
    assert done.returncode == 0, done.stderr
    args = launch_args(run_train_sh.stubs)
    assert args[args.index("--mixed_precision") + 1] == "no"
