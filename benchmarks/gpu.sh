#!/usr/bin/env bash
# The prepared GPU run, for a machine lent through the device tool (one call, about 10 minutes of
# an H200 with its start): the gpu-marked tests, then the GPU benchmarks, into one archive.
#
#   bash benchmarks/gpu.sh            # results under $OUT (the device tool's) or benchmarks/results/gpu
#   DEVICE=cpu bash benchmarks/gpu.sh # the same steps on the CPU: a rehearsal of the script
#
# It uses the machine's own python3 and CUDA torch. Python packages that machine lacks travel as
# wheels in .whl/ (the redis client: `pip download --no-deps -d .whl redis==8.1.0`, .whl named in
# the tool's carry) and are installed first. Every step runs even if one before it failed; the
# exit code is the number of failed steps.
set -u
device=${DEVICE:-cuda}
out=${OUT:-benchmarks/results/gpu}
work=$(mktemp -d)
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
failed=0
step() {  # step NAME COMMAND...: run it, log it, count a failure
    echo "=== $1: ${*:2}"
    "${@:2}" 2>&1 | tee "$work/$1.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "=== $1 FAILED"; failed=$((failed + 1)); }
}
step machine python3 -c "import torch, transformers; print(torch.__version__, torch.version.cuda, \
transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
# only the GPU test files: the others import the serving stack (ray, fastapi), absent there
step tests python3 -m pytest -q -m gpu -p no:cacheprovider tests/models/test_device.py \
    tests/serve/test_engine_shipped.py tests/models/test_attention_backends.py \
    tests/models/test_families_low_precision.py tests/serve/test_engine_families.py
# every VLM family in bf16 on the GPU (flash-attn where installed) against transformers
attention=$(python3 -c "import importlib.util as u; print('flash_attn' if u.find_spec('flash_attn') else 'sdpa')")
for family in llava llava-next llava-onevision qwen2-vl qwen2.5-vl; do
    step "random_$family" python3 -m serve.cli make-random-checkpoint --family "$family" --out "$work/ckpt-$family"
    step "check_$family" python3 -m serve.cli check-model --model "$work/ckpt-$family" --dtype bf16 \
        --device "$device" --attention "$attention"
done
rm -rf "$work"/ckpt-*
step verify_batch python3 -m benchmarks.verify_batch --device "$device" --repeats 40 --out "$work"
step spec_decode_long python3 -m benchmarks.spec_decode --device "$device" --mode long --max-tokens 128 \
    --repeats 2 --only ours_spec_adapter ours_no_spec hf_generate hf_assisted_adapter --out "$work"
step concurrency python3 -m benchmarks.concurrency --device "$device" --levels 1 4 16 --repeats 3 --out "$work"
tar czf "$out/gpu_results.tgz" -C "$work" .
echo "=== $failed failed step(s); results in $out/gpu_results.tgz"
exit "$failed"
