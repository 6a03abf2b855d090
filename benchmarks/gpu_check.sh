#!/usr/bin/env bash
# The GPU checks in one call, within 10 minutes at worst (every step's limit; about 5 expected), on a machine with CUDA, torch, timm and transformers:
#
#   bash benchmarks/gpu_check.sh                 # results under $OUT (or benchmarks/gpu_results)
#   DEVICE=cpu SKIP_SUITE=1 bash benchmarks/gpu_check.sh   # a dry run of the script itself on a CPU
#
# 1. pytest -m gpu (tests/test_triton.py: the Triton kernels natively; tests/test_gpu.py: each layer against its formula in fp32/bf16/fp16, converted models
#    on CUDA against the CPU on the same weights, opcheck of every normswap operator, compile, scripting);
# 2. normswap validate --device cuda on timm and HF models with several specs;
# 3. benchmarks/suite.py --device cuda --quick (tables with date, torch version and GPU name; every layer in
#    fp32 and bf16, against torch's layers (GroupNorm on channels_last inputs against nn.GroupNorm on
#    contiguous and channels_last ones), Liger-Kernel's RMSNorm / LayerNorm where installed, Ghost
#    BatchNorm's split/cat and reshaped-batch forms, Weight Standardization's torch ops).
# Nothing is installed from elsewhere: the working tree is put on PYTHONPATH, and wheels found in .whl/ (for
# Liger-Kernel, which the GPU image lacks: `echo /.whl/ >> .git/info/exclude; pip download --no-deps
# --only-binary=:all: --python-version 3.12 -d .whl liger-kernel`, then carry .whl) go to a private folder.
# Each step has its own time limit, and a failing step does not stop the others; the exit status is that
# of the first failing step.
set -u
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
RESULTS=${OUT:-benchmarks/gpu_results}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$SITE"
fi
status=0
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $RESULTS/NAME.txt, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$RESULTS/$name.txt" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - start))s; last lines:"
    tail -n 5 "$RESULTS/$name.txt" | sed 's/^/   | /'
    [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
    return 0
}

$PY - >"$RESULTS/env.txt" 2>&1 <<'EOF'
import datetime, platform, torch
print("date:", datetime.date.today().isoformat())
print("python:", platform.python_version(), "torch:", torch.__version__, "cuda:", torch.version.cuda)
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("timm", "transformers", "triton", "liger_kernel"):
    try:
        __import__(name)
        from importlib.metadata import version
        print(f"{name}:", version(name.replace("_", "-")))
    except ImportError:
        print(f"{name}: absent")
EOF
cat "$RESULTS/env.txt"

step pytest_gpu 200 $PY -m pytest -q -m gpu -o addopts="" -p no:cacheprovider tests/test_gpu.py tests/test_triton.py -rs --durations=5

# a tiny HF folder for validate (random weights, nothing downloaded)
HF_DIR=$(mktemp -d)
$PY - "$HF_DIR" <<'EOF'
import sys, torch, transformers
torch.manual_seed(0)
config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128)
transformers.BertModel(config).save_pretrained(sys.argv[1])
EOF
step validate_resnet18_gn_ws 60 $PY -m normswap validate --model timm:resnet18 --spec gn_ws --device "$DEVICE" --image-size 96
step validate_resnet18_ghost_bn 40 $PY -m normswap validate --model timm:resnet18 --spec ghost_bn --device "$DEVICE" --image-size 96 --skip compile
step validate_convnext_atto_rms 40 $PY -m normswap validate --model timm:convnext_atto --spec rms --device "$DEVICE" --image-size 96 --skip compile
step validate_vit_tiny_bert_ln 50 $PY -m normswap validate --model timm:vit_tiny_patch16_224 --spec bert_ln --device "$DEVICE" --skip compile
step validate_hf_bert_rms 40 $PY -m normswap validate --model "$HF_DIR" --spec rms --device "$DEVICE" --skip compile
rm -rf "$HF_DIR"

if [ "${SKIP_SUITE:-0}" != 1 ]; then
    step suite 160 $PY benchmarks/suite.py --device "$DEVICE" --quick --out "$RESULTS/benchmarks_$DEVICE.md"
fi

echo "== results in $RESULTS (exit status $status)"
for f in "$RESULTS"/*; do
    echo "---- $f"
    cat "$f"
done
exit $status
