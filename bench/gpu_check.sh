#!/usr/bin/env bash
# Bastion's GPU checks as one prepared run (at most ~9.5 minutes), for a machine lent for a short
# time: the CUDA paths of the training tests, then training throughput and MFU against
# transformers' LlamaForCausalLM for a GPT-2-small-class model (~124M), eager and compiled.
#
#   make gpu-wheels                 # here: wheels of what the GPU image lacks -> .whl/
#   bash bench/gpu_check.sh         # there, from the repository root (carry .whl)
#
# Results go to $OUT (default runs/gpu-check): env.txt, tests.log, eager.json / .log,
# profile.json / .log, compile.json / .log, quantize.log (9 files: what the device tool brings back). Each stage has its own time limit and a failed stage does not stop
# the next, so one run always brings back whatever it could measure.
set -u
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
          torch.cuda.get_device_name(), '| transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? after ${SECONDS}s in total"
    tail -n 25 "$OUT/$name.log"
}

# The training tests pick CUDA by themselves (train.device: auto): bf16 autocast, compile,
# fused AdamW and pinned-memory batches on the GPU. Written for the CPU: a test that needs
# bit-exact repeats may meet CUDA's nondeterministic kernels; all run, failures are listed.
stage tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/train/test_train.py tests/model

common=(--device cuda --preset base --model-vocab 50304 --seq-len 1024 --batch-size 16 --dtype bfloat16 --warmup 5)
stage eager 120 "$PY" bench/train_throughput.py "${common[@]}" --rounds 2 --steps 20 --json "$OUT/eager.json"
# Where the eager step's time goes: top kernels and how busy the GPU is (the tuning lead).
stage profile 60 "$PY" bench/profile_step.py "${common[@]}" --steps 3 --json "$OUT/profile.json"
stage compile 180 "$PY" bench/train_throughput.py "${common[@]}" --rounds 1 --steps 30 --compile --json "$OUT/compile.json"
# Quantized inference on CUDA (torchao's linears; never run on a GPU yet): fp32 / bf16 / int8 /
# int4 decode tok/s, 16 concurrent, CUDA peak memory and logit error, d1024 x 12 (issue 15).
stage quantize 120 "$PY" bench/quantize.py --device cuda --skip-quality --skip-qlora
