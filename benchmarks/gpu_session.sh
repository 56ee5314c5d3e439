#!/bin/bash
# One lent GPU session (benchmarks/README: the device tool), everything under $OUT: the fused varlen kernel's test,
# then benchmarks/gpu.py on SmolLM2-1.7B's architecture, sequences up to 2048 tokens, one config per run.
# build/gpu_site holds pytest (the machine has torch and transformers only): carry it.
set -u
PY=$(command -v python || command -v python3)
export PYTHONPATH=$PWD:$PWD/build/gpu_site TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/nvidia-smi.txt 2>&1
$PY -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)" \
    > $OUT/env.txt 2>&1
timeout 120 $PY -m pytest -q -p no:cacheprovider --noconftest tests/unit/test_attention_op.py \
    > $OUT/kernel_test.log 2>&1
common="--max-length 2048 --max-prompt-length 1024 --steps 4 --repeats 2 --no-sdpa-probe"
run() {  # name, seconds, gpu.py arguments
    local name=$1 seconds=$2
    shift 2
    timeout $seconds $PY benchmarks/gpu.py $common "$@" --out $OUT/$name > $OUT/$name.log 2>&1
    echo "$name: exit $?" >> $OUT/env.txt
}
run selective 150 --variants varlen before --activation-checkpointing selective
run compile 120 --variants varlen --no-reference --no-kernel-check --activation-checkpointing selective --compile
run none 80 --variants varlen --no-reference --no-kernel-check --activation-checkpointing none
