#!/usr/bin/env bash
# Real-GPU check of the agent's NVML backend, for a machine with an NVIDIA GPU,
# its driver, and python3 with PyTorch (no Go toolchain needed there).
#
#   make build                      # here: builds bin/visionslice-agent
#   test/gpu/check.sh [AGENT_BIN]   # there
#
# It starts the agent with --gpu-backend=nvml, starts a PyTorch process that
# allocates 1 GiB and then 4 GiB more on GPU 0, and checks, for each stage,
# that the agent's per-process figure (/debug/gpu) matches what nvidia-smi
# reports for that PID within 2%, and that the growth it reports matches the
# 4 GiB the process added within 2%. It prints one line per check and exits
# non-zero on any failure.
set -euo pipefail

bin=${1:-bin/visionslice-agent}
port=${VISIONSLICE_CHECK_PORT:-19402}
out=${OUT:-$(mktemp -d)}
log=$out/agent.log
fail=0

say() { echo "gpu-check: $*"; }
check() { # name ok(0/1) detail
	if [ "$2" = 1 ]; then say "PASS $1 ($3)"; else say "FAIL $1 ($3)"; fail=1; fi
}

nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu-check: gpu: /'

"$bin" --gpu-backend=nvml --metrics-listen=127.0.0.1:$port --poll-interval=100ms --node-name=gpu-check 2>"$log" &
agent=$!
fifo_dir=$(mktemp -d)
mkfifo "$fifo_dir/go"
cleanup() {
	kill "$agent" 2>/dev/null || true
	[ -n "${torch:-}" ] && kill "$torch" 2>/dev/null || true
	rm -rf "$fifo_dir"
}
trap cleanup EXIT

for _ in $(seq 100); do
	curl -sf "127.0.0.1:$port/readyz" >/dev/null && break
	sleep 0.1
done
curl -sf "127.0.0.1:$port/readyz" >/dev/null || { say "FAIL agent not ready"; cat "$log"; exit 1; }
check agent_ready 1 "nvml backend up"

# The allocating process: 1 GiB, wait for "go", 4 GiB more, then sleep.
python3 -u - "$fifo_dir/go" >"$out/torch.log" 2>&1 <<'PY' &
import sys, time, torch
a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0"); a.fill_(1)
torch.cuda.synchronize(); print("stage1", flush=True)
open(sys.argv[1]).read()
b = torch.empty(4 << 30, dtype=torch.uint8, device="cuda:0"); b.fill_(1)
torch.cuda.synchronize(); print("stage2", flush=True)
time.sleep(600)
PY
torch=$!

wait_stage() {
	for _ in $(seq 300); do grep -q "$1" "$out/torch.log" && return 0; sleep 0.1; done
	say "FAIL torch did not reach $1"; cat "$out/torch.log"; exit 1
}

# agent_mib PID: the process's memory on any GPU as the agent reports it.
agent_mib() {
	curl -sf "127.0.0.1:$port/debug/gpu" | python3 -c '
import json, sys
pid = int(sys.argv[1]); s = json.load(sys.stdin)
print(sum(p["usedMemoryBytes"] for p in s["processes"] if p["pid"] == pid) / 2**20)' "$1"
}
smi_mib() {
	nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | awk -F', *' -v p="$1" '$1==p {s+=$2} END {print s+0}'
}
within() { python3 -c "import sys; a,b,t=map(float,sys.argv[1:]); print(1 if b>0 and abs(a-b)<=t*b else 0)" "$@"; }

wait_stage stage1
sleep 0.5
a1=$(agent_mib "$torch"); s1=$(smi_mib "$torch")
check stage1_vs_nvidia_smi "$(within "$a1" "$s1" 0.02)" "agent ${a1} MiB, nvidia-smi ${s1} MiB"
check stage1_at_least_1GiB "$(python3 -c "print(1 if $a1 >= 1024 else 0)")" "agent ${a1} MiB (1 GiB tensor plus CUDA context)"

echo go >"$fifo_dir/go"
wait_stage stage2
sleep 0.5
a2=$(agent_mib "$torch"); s2=$(smi_mib "$torch")
check stage2_vs_nvidia_smi "$(within "$a2" "$s2" 0.02)" "agent ${a2} MiB, nvidia-smi ${s2} MiB"
grow=$(python3 -c "print($a2 - $a1)")
check growth_is_4GiB "$(within "$grow" 4096 0.02)" "agent saw +${grow} MiB for a 4096 MiB tensor"

metrics=$(curl -sf "127.0.0.1:$port/metrics")
echo "$metrics" | grep -E '^visionslice_gpu_(memory_used_bytes|healthy|utilization_ratio|info)' | sed 's/^/gpu-check: metric: /'
used=$(echo "$metrics" | awk '/^visionslice_gpu_memory_used_bytes\{gpu="0"/ {print $2/1048576}')
check device_used_covers_process "$(python3 -c "print(1 if $used >= $a2 else 0)")" "gpu 0 used ${used} MiB >= process ${a2} MiB"

kill -TERM "$agent"
if wait "$agent"; then check agent_sigterm 1 "clean exit"; else check agent_sigterm 0 "exit code $?"; fi
grep -q '"msg":"stopped"' "$log" && check agent_stopped_log 1 "logged stopped" || check agent_stopped_log 0 "see $log"
exit $fail
