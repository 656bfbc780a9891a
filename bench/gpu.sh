#!/usr/bin/env bash
# The GPU checks and GPU step figures of issue 8 in one go, for a machine with one CUDA device:
# the method tests (their CUDA parity tests run there), the data layer's CUDA tests (the network
# input and the batch rotation of the device path), then bench.step for both fusions at
# 256 x 256 with resnet50, batch 64, bf16 autocast and channels_last: eager, with the network
# compiled, and with network and objective compiled. Every report also lands in OUT_DIR as JSON.
#
#   bash bench/gpu.sh OUT_DIR [PEAK_TFLOPS]     # PEAK_TFLOPS: the GPU's dense bf16 peak (H100 SXM: 989)
set -uo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR [PEAK_TFLOPS]}
peak=${2:-989}
python=${PYTHON:-python3}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$python" -m pytest -q -p no:cacheprovider tests/method 2>&1 | tee "$out/method_tests.log" | tail -n 20
"$python" -m pytest -q -p no:cacheprovider -k cuda tests/data/test_scaling.py tests/data/test_pipeline_transforms.py 2>&1 \
    | tee "$out/data_cuda_tests.log" | tail -n 5
common=(--encoder resnet50 --batch 64 --peak-tflops "$peak" --warmup 5 --repeats 15)
"$python" -m bench.step "${common[@]}" --json "$out/step_eager.json"
"$python" -m bench.step "${common[@]}" --compile --json "$out/step_compiled.json"
"$python" -m bench.step "${common[@]}" --compile --compile-objective --json "$out/step_all_compiled.json"
