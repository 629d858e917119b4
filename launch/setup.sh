#!/usr/bin/env bash
# All set-up on a fresh Debian 12 / Python 3.11 machine (run as root): the Fashion-MNIST Debian package
# and distgan with its test extras. torch is pinned first so that nothing pulls CUDA wheels on a CPU machine;
# on a GPU machine install the CUDA build of torch 2.13 instead before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
# torch-fidelity, the reference of tests/test_metrics_reference.py: without its deps (torchvision pulls CUDA torch), in
# a folder of its own (installed, it would make torchmetrics import it, and so torchvision)
python3 -m pip install -q --no-deps --target "${DISTGAN_REFERENCE:-$HOME/.cache/distgan/reference}" "torch-fidelity==0.4.0"
