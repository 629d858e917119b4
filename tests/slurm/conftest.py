"""A real local Slurm cluster (slurm/cluster.py), started once per session for the slurm tests."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import cannot_run

REPO = Path(__file__).resolve().parents[2]


def load_cluster_module() -> ModuleType:
    """slurm/ is a folder of scripts, not a package: load cluster.py by path, once, with its siblings
    (slurm_conf.py, job_processes.py) importable as they are when it runs as a script."""
    name = "distgan_slurm_cluster"
    if name not in sys.modules:
        if str(REPO / "slurm") not in sys.path:
            sys.path.insert(0, str(REPO / "slurm"))
        spec = importlib.util.spec_from_file_location(name, REPO / "slurm" / "cluster.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


@pytest.fixture(scope="session")
def cluster_lib() -> ModuleType:
    """slurm/cluster.py, once Slurm is installed; a skip with the reason (a failure under CI) when it cannot be."""
    if os.geteuid() != 0:
        cannot_run("the local Slurm cluster needs root (slurmd runs jobs as any user, apt-get installs it)",
                   "run the tests as root, as .ci/run does")
    lib = load_cluster_module()
    try:
        lib.ensure_slurm_installed()
    except lib.SlurmUnavailable as err:
        cannot_run(f"Slurm is not installed and cannot be: {err}",
                   "CI needs apt-get and Debian 12's slurmctld, slurmd and slurm-client")
    return lib


@pytest.fixture(scope="session")
def slurm_cluster(cluster_lib: ModuleType, tmp_path_factory: pytest.TempPathFactory):
    """Three nodes, n1 to n3, all on this machine; stopped (every PID it started) at the session's end.

    2-node jobs run on n1 and n2; n3 is where a requeued job goes when a test kills n2 (a node failure)."""
    with cluster_lib.LocalSlurmCluster(tmp_path_factory.mktemp("slurm-cluster"), nodes=3) as cluster:
        yield cluster
