#!/usr/bin/env bash
# Every check that needs a GPU, in one run of under 8 minutes on one H200, writing one table.
#
#   bash scripts/gpu_check.sh                  # on the lent machine (torch + Lightning there; hydra carried)
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh   # the same plumbing on a CPU (CUDA rows say "skipped")
#
# The lent machine has torch and Lightning but not hydra-core/omegaconf/antlr4/pybind11: carry them as
# wheels in .whl/ (see the device tool's README) and name .whl in `carry`; they are installed into
# /tmp/site. The C++ core is built in place. Results: $OUT/gpu_check.md (or ./gpu_check.md), one row per
# check: name, result, figure, the baseline measured in the same run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-.}
TABLE="$OUT_DIR/gpu_check.md"
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ls omnibal_pl/balance/_core*.so >/dev/null 2>&1 || "$PY" setup.py -q build_ext --inplace >"$OUT_DIR/build.log" 2>&1
echo "| check | result | figure | baseline (same run) |" >"$TABLE"
echo "| --- | --- | --- | --- |" >>"$TABLE"

row() { echo "| $1 | $2 | $3 | $4 |" | tee -a "$TABLE"; }

# 1. The gpu-marked tests: attention backends (bf16, fp32 fallback, broken flash-attn import), pinned loading.
if [ "$DEVICE" = cuda ]; then
  if timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests >"$OUT_DIR/gpu_tests.log" 2>&1; then
    row "pytest -m gpu" pass "$(tail -1 "$OUT_DIR/gpu_tests.log")" "-"
  else
    row "pytest -m gpu" FAIL "$(tail -1 "$OUT_DIR/gpu_tests.log")" "see gpu_tests.log"
  fi
else
  row "pytest -m gpu" skipped "no CUDA" "-"
fi

# 2. The CUDA paths of one run, measured: model vs machine for memory and time per recompute mode,
#    the pipeline runtime on NCCL (world size 1), a DCP save/load round trip, and a bf16-mixed train step's MFU.
timeout 300 "$PY" - "$DEVICE" >>"$TABLE" 2>"$OUT_DIR/gpu_runtime.log" <<'EOF'
import os, sys, tempfile, time
import torch, torch.distributed as dist
from omnibal_pl.batch import MicroBatchShape
from omnibal_pl.conf import preset
from omnibal_pl.model import VLM, VLMConfig
from omnibal_pl.model.flops import train_flops
from omnibal_pl.plan.cost_model import cost_model_profile
from omnibal_pl.plan.profiler import profile_batch
from omnibal_pl.train.objective import packed_loss_sum

device = torch.device(sys.argv[1])
cuda = device.type == "cuda"
cfg = VLMConfig.from_dict(preset("model", "internvl_100m"))
shape = MicroBatchShape(vit_cap=8, token_cap=2048, samples=4)
batch = profile_batch(cfg, shape).to(device)

def step(model, recompute):
    model.set_recompute(recompute)
    if cuda:
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        loss_sum, weight = packed_loss_sum(model(batch), batch)
    (loss_sum / weight).backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else float("nan")
    model.zero_grad(set_to_none=True)
    return seconds, peak

torch.manual_seed(0)
model = VLM(cfg).to(device).train()
step(model, "none")  # warm-up
modelled = cost_model_profile(cfg, shape, "h200")
for mode in ("none", "attention", "full"):
    seconds, peak = step(model, mode)
    predicted = sum(b.activation_bytes(mode) for b in modelled.blocks)
    print(f"| internvl_100m activations, recompute={mode} (bf16-mixed) | {'measured' if cuda else 'skipped'} | "
          f"{peak / 2**20:.0f} MiB measured, {seconds * 1e3:.1f} ms | {predicted / 2**20:.0f} MiB cost model |")
seconds, _ = step(model, "none")
flops = train_flops(cfg, shape.vit_cap, shape.seqlens)
print(f"| internvl_100m train step MFU vs 989 TFLOP/s (bf16-mixed) | {'measured' if cuda else 'skipped'} | "
      f"{flops / seconds / 989e12:.3f} | - |")

if cuda:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29571")
    dist.init_process_group("nccl", rank=0, world_size=1)
    from omnibal_pl.parallel import build_mesh, build_pipeline, initial_state_dict
    from omnibal_pl.parallel import dcp
    from omnibal_pl.plan import uniform_plan
    mesh, _ = build_mesh(1, device_type="cuda")
    plan = uniform_plan(cfg, 1, 2, shape.vit_cap, shape.token_cap)
    loss_fn = lambda logits, b: (lambda s, w: s / w.clamp(min=1))(*packed_loss_sum(logits, b))
    runner = build_pipeline(cfg, plan, mesh, initial_state_dict(cfg, 0), loss_fn, device)
    batches = [profile_batch(cfg, shape, seed=k) for k in range(2)]
    losses = [float(runner.train_step(batches)) for _ in range(2)]
    norm = float(runner.clip_grad_norm_(1.0))
    with tempfile.TemporaryDirectory() as tmp:
        state = dcp.model_state(runner.modules)
        dcp.save(__import__("pathlib").Path(tmp), state, {}, {"ok": 1}, True)
        ok = (__import__("pathlib").Path(tmp) / ".metadata").is_file()
    print(f"| pipeline runtime on CUDA + NCCL (pp=1, 2 micro-batches), clip, DCP save | "
          f"{'pass' if ok and all(l == l for l in losses) else 'FAIL'} | losses {losses[0]:.4f}, {losses[1]:.4f}; "
          f"norm {norm:.3f} | - |")
    dist.destroy_process_group()
else:
    print("| pipeline runtime on CUDA + NCCL | skipped | no CUDA | - |")
EOF
[ $? -eq 0 ] || row "CUDA runtime checks" FAIL "$(tail -3 "$OUT_DIR/gpu_runtime.log" | tr '\n|' ' /')" "see gpu_runtime.log"

# 2b. The plan's memory model against the CUDA allocator: a profile measured on the device (bf16-mixed), the
#     plan's predicted static + activation bytes per recompute mode, and the trial runner's allocator peak.
timeout 200 "$PY" - "$DEVICE" >>"$TABLE" 2>"$OUT_DIR/gpu_trial.log" <<'EOF'
import sys
from omnibal_pl.batch import MicroBatchShape
from omnibal_pl.conf import preset
from omnibal_pl.model import VLMConfig
from omnibal_pl.model.block import RECOMPUTE_MODES
from omnibal_pl.plan.make import plan_from_partition, planning_inputs
from omnibal_pl.plan.partition import evaluate_partition
from omnibal_pl.plan.profiler import profile_batch
from omnibal_pl.train.trial import run_trials

device = sys.argv[1]
cuda = device == "cuda"
cfg = VLMConfig.from_dict(preset("model", "internvl_100m"))
shape = MicroBatchShape(vit_cap=8, token_cap=2048, samples=4)
precision = "bf16-mixed" if cuda else "32-true"
inputs = planning_inputs(cfg, 1, 2, shape.vit_cap, shape.token_cap, device="local", source="profile",
                         samples=shape.samples, precision=precision, profile_cache="/tmp/gpu_check_profiles")
bounds = (0, len(cfg.block_names()))
plans = [plan_from_partition(cfg, inputs, evaluate_partition(inputs.profile, inputs.config, bounds, mode))
         for mode in RECOMPUTE_MODES]
batches = [[profile_batch(cfg, shape, seed=k) for k in range(2)]]
trials = run_trials(cfg, plans, batches, steps=2, device_type=device, precision=precision)
for mode, trial in zip(RECOMPUTE_MODES, trials):
    r = trial.ranks[0]
    predicted = trial.plan.notes["stage_static_bytes"][0] + trial.plan.notes["stage_activation_bytes"][0]
    peak = r.device_peak_bytes if cuda else r.peak_bytes
    print(f"| internvl_100m stage peak, recompute={mode} ({precision}, trial runner) | "
          f"{'allocator' if cuda else 'saved-tensor probe'} | {peak / 2**20:.0f} MiB measured, "
          f"{trial.step_s * 1e3:.0f} ms/step | {predicted / 2**20:.0f} MiB predicted (static + activations) |")
EOF
[ $? -eq 0 ] || row "trial runner memory vs plan" FAIL "$(tail -3 "$OUT_DIR/gpu_trial.log" | tr '\n|' ' /')" "see gpu_trial.log"

# 2c. Dynamic-LLaVA decoding on the device: FLOPs, KV cache and time, sparsified beside dense.
if timeout 120 "$PY" scripts/bench_sparsify.py --device "$DEVICE" >"$OUT_DIR/bench_sparsify.log" 2>&1; then
  row "bench_sparsify.py --device $DEVICE" done "$(grep -m1 -i "sparsif" "$OUT_DIR/bench_sparsify.log" | tr -s ' |' ' ' | cut -c1-90)" \
      "$(grep -m1 -i dense "$OUT_DIR/bench_sparsify.log" | tr -s ' |' ' ' | cut -c1-90)"
else
  row "bench_sparsify.py --device $DEVICE" FAIL "$(tail -1 "$OUT_DIR/bench_sparsify.log")" "see bench_sparsify.log"
fi

# 2d. Loader tiles kept uint8 and normalised on the device (tiling.pixels=uint8) against the CPU's float32 tiles,
#     and the host-to-device copy that saves (64 tiles of 448 px, pinned on CUDA).
if "$PY" - "$DEVICE" >"$OUT_DIR/gpu_pixels.log" 2>&1 <<'EOF'
import sys
import time

import torch

from omnibal_pl.pixels import normalise

device = sys.argv[1]
mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
raw = torch.randint(0, 256, (64, 3, 448, 448), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
cpu = normalise(raw, mean, std)
dev = normalise(raw.to(device), mean, std).cpu()
fp32 = (dev - cpu).abs().max().item()
bf16 = (dev.bfloat16().float() - cpu.bfloat16().float()).abs().max().item()


def copy_ms(x: torch.Tensor) -> float:
    x = x.pin_memory() if device == "cuda" else x
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        x.to(device, non_blocking=True)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        x.to(device, non_blocking=True)
    sync()
    return (time.perf_counter() - start) / 10 * 1e3


verdict = "pass" if fp32 < 1e-5 and bf16 <= 2**-6 else "FAIL"  # an ulp of float32; at most one bf16 step near 2.6
print(f"| uint8 tiles normalised on {device} vs CPU float32 | {verdict} | max diff {fp32:.1e} (fp32), {bf16:.1e} (bf16); "
      f"copy {copy_ms(raw):.2f} ms (uint8) | copy {copy_ms(cpu):.2f} ms (float32) |")
EOF
then
  grep '^|' "$OUT_DIR/gpu_pixels.log" | tee -a "$TABLE"
else
  row "uint8 tiles normalised on the device" FAIL "$(tail -1 "$OUT_DIR/gpu_pixels.log")" "see gpu_pixels.log"
fi

# 2e. The packing study on the device (issue 13 item 6): packing on vs off, ms per sample, at 1, 8 and 20 tiles and
#     the mixed draw; the figure is the 20-tile row (packing's smallest gain on the CPU), the baseline the 1-tile row.
if timeout 120 "$PY" scripts/bench_packing.py --device "$DEVICE" --tiles 1 8 20 --steps 2 --reps 2 \
    >"$OUT_DIR/bench_packing.log" 2>&1; then
  row "bench_packing.py --device $DEVICE (tiles off/on ms, DP 4 off/on)" done \
      "$(grep -E '^ +20 ' "$OUT_DIR/bench_packing.log" | tr -s ' ' | cut -c1-90); mixed: $(grep -m1 '^ *mixed' "$OUT_DIR/bench_packing.log" | tr -s ' ' | cut -c1-80)" \
      "$(grep -E '^ +1 ' "$OUT_DIR/bench_packing.log" | tr -s ' ' | cut -c1-90)"
else
  row "bench_packing.py --device $DEVICE" FAIL "$(tail -1 "$OUT_DIR/bench_packing.log")" "see bench_packing.log"
fi

# 3. Simulated DP=8 step time per sampler on the device (the balance benchmark), beside random and the timing's
#    own idle floor (identical ranks): every sampler's whole epoch over the same 128 samples, as on the CPU.
if timeout 200 "$PY" scripts/bench_train.py --models internvl_100m --device "$DEVICE" --steps 0 --samples 128 \
    --repeats 2 --reps 2 >"$OUT_DIR/bench_train.log" 2>&1; then
  row "bench_train.py --device $DEVICE (internvl_100m, DP=8 simulated)" done \
      "$(grep -m1 '^balanced ' "$OUT_DIR/bench_train.log" | tr -s ' ' | cut -c1-90)" \
      "$(grep -m1 '^random ' "$OUT_DIR/bench_train.log" | tr -s ' ' | cut -c1-90); $(grep -m1 '^identical ' "$OUT_DIR/bench_train.log" | tr -s ' ' | cut -c1-90)"
else
  row "bench_train.py --device $DEVICE" FAIL "$(tail -1 "$OUT_DIR/bench_train.log")" "see bench_train.log"
fi
echo "table: $TABLE"
