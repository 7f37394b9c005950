#!/usr/bin/env bash
# The evidence cells of a charlm plan (default benchmarks/plans/gpu.json) on one lent GPU, inside one device call
# (see RESULTS.md). Usage (repo root, on the GPU machine): DYNTIE_SHARED=<folder holding data/> \
#   bash benchmarks/plans/gpu_run.sh <output dir> [deadline seconds] [workers] [plan]
# e.g. the Llama stage of issue 25: ... gpu_run.sh /tmp/out 520 15 benchmarks/plans/llama_u4_cpu.json
# Many small charlm.py processes share the GPU; CUDA's multi-process service (MPS) lets their tiny kernels
# run side by side instead of time-sliced. It is started only if present and a real CUDA cell runs under it.
set -u
out=${1:?output dir}; deadline=${2:-500}; workers=${3:-15}; plan=${4:-benchmarks/plans/gpu.json}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi -L
python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
probe() {  # one quick greedy + final-map cell on CUDA: the whole code path, in seconds
  timeout 120 python3 benchmarks/charlm.py --quick --device cuda --rows greedy,final_map:greedy --seeds 0 \
    --output /tmp/probe_$1 --runs-root /tmp/probe_$1/runs > /tmp/probe_$1.log 2>&1
}
if command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  if nvidia-cuda-mps-control -d && probe mps; then
    echo "MPS on"
  else
    echo "MPS probe failed, running without it:"; tail -5 /tmp/probe_mps.log
    echo quit | timeout 10 nvidia-cuda-mps-control
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
else
  echo "no nvidia-cuda-mps-control: processes are time-sliced"
fi
if [ -z "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && ! probe plain; then
  echo "CUDA probe failed:"; tail -30 /tmp/probe_plain.log; exit 1
fi
python3 benchmarks/charlm_pool.py --plan "$plan" --workers "$workers" --deadline "$deadline" \
  --device cuda --output "$out" --scratch /tmp/pool
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv
[ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && echo quit | timeout 10 nvidia-cuda-mps-control
exit 0
