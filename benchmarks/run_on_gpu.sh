#!/usr/bin/env bash
# Everything that needs a GPU, in one command (a lent GPU machine is billed by the second):
#   setup           pip-install this repo (editable, offline) and the peers' wheels found in .whl/
#   tests           the kernels' numerics suite compiled and run on CUDA (tests/kernels, cuda suite),
#                   then tests/test_backend_cuda.py (the compile backend with the Triton lowering)
#   attn [GRID [OPTIONS]]  benchmarks/attn_res/bench_attn_res.py --grid GRID (default: quick) OPTIONS
#   ops [PRESET]    benchmarks/attn_res/bench_ops.py --preset PRESET (default: backend): each op alone
#   backend [ARGS]  benchmarks/backend/bench_backend.py --gpu-size ARGS
#   floor [ARGS]    benchmarks/backend/project_floor.py ARGS: issue 13's question in one step (a few
#                   minutes): each schedule op timed at T=8192, hidden 2048, bf16, phase 1 for m = 2..8,
#                   as % of copy bandwidth; the step / no_grad-forward ratios projected from them and
#                   the emitted graphs; inductor's mix_order_reduction
# Usage:  bash benchmarks/run_on_gpu.sh setup tests "attn quick" "backend --only original+inductor"
# Peers' wheels (pure Python) for the setup step, fetched where PyPI is reachable, carried as .whl:
#   echo /.whl/ >> .git/info/exclude; cd .whl && for p in liger-kernel==0.8.5 fla-core==0.6.0 \
#   flash-attn-res==0.1.12 fast-attnres==2.1.0; do pip download --no-deps $p; done
# Results go to $OUT when set (the device tool brings that folder back), else benchmarks/results/.
# Each step has its own time limit (STEP_TIMEOUT, seconds) so one hang cannot eat the others;
# TESTS_K passes a pytest -k expression to the tests step.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
STEP_TIMEOUT=${STEP_TIMEOUT:-300}

step() {  # step NAME CMD...: runs CMD with a limit, logs to $RESULTS/log-NAME.txt, reports the status
    local name=$1; shift
    local t0=$SECONDS
    timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee "$RESULTS/log-$name.txt"
    echo "== step $name: rc=${PIPESTATUS[0]} in $((SECONDS - t0)) s"
}

for spec in "$@"; do
    read -r cmd args <<<"$spec"
    read -r grid attn_args <<<"$args"  # attn: "attn GRID [bench_attn_res.py options]"
    case $cmd in
        setup)
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
            if compgen -G ".whl/*.whl" >/dev/null; then
                python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || echo "peer wheels: install failed"
            fi
            python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
            python3 -c "import torch, triton, residual_rewriter; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
            ;;
        tests)
            # the cuda run of tests/kernels/test_kernels_subprocess.py, inline so its progress streams
            RR_KERNELS_SUITE=numerics RR_KERNELS_DEVICE=cuda step tests-kernels \
                python3 -m pytest -v -p no:cacheprovider --durations=10 tests/kernels/numerics ${TESTS_K:+-k "$TESTS_K"}
            step tests-backend python3 -m pytest -v -p no:cacheprovider tests/test_backend_cuda.py
            ;;
        attn)
            # shellcheck disable=SC2086
            step "attn-${grid:-quick}" python3 benchmarks/attn_res/bench_attn_res.py --grid "${grid:-quick}" \
                --out "$RESULTS" $attn_args
            ;;
        ops)
            step "ops-${grid:-backend}" python3 benchmarks/attn_res/bench_ops.py --preset "${grid:-backend}" --out "$RESULTS"
            ;;
        backend)
            # shellcheck disable=SC2086
            step backend python3 benchmarks/backend/bench_backend.py --gpu-size --out "$RESULTS" $args
            ;;
        floor)
            # shellcheck disable=SC2086
            step floor python3 benchmarks/backend/project_floor.py --out "$RESULTS" $args
            ;;
        *)
            echo "unknown step: $cmd"; exit 2
            ;;
    esac
done
