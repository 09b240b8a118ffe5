#!/usr/bin/env bash
# Does every comparison in the suite hold on other CPUs? Runs the suite (or the tests named)
# under settings that change the kernels torch and oneDNN pick and the order of their sums
# (standing in for another CPU family), each comparison logging the fraction of its tolerance
# it used, then prints the largest per test line: near 1 is fragile, far below 0.01 is loose.
# Usage: bash scripts/tolerances.sh [pytest arguments, default: tests]   (about 8 min a setting)
set -u
cd "$(dirname "$0")/.."
log=$(mktemp -d)
settings=("OMP_NUM_THREADS=2" "OMP_NUM_THREADS=1" "OMP_NUM_THREADS=2 ATEN_CPU_CAPABILITY=avx2"
          "OMP_NUM_THREADS=2 ATEN_CPU_CAPABILITY=default" "OMP_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=AVX2")
status=0
for i in "${!settings[@]}"; do
    echo "== ${settings[$i]}"
    env ${settings[$i]} TOLERANCE_LOG="$log/$i.jsonl" python -m pytest -q -p no:cacheprovider "${@:-tests}" \
        > "$log/$i.out" 2>&1 || status=1
    grep -E "^FAILED|^ERROR|passed|failed" "$log/$i.out"
done
python - "$log" "${settings[@]}" <<'PY'
import json, os, sys
folder, settings = sys.argv[1], sys.argv[2:]
worst = {}  # test line -> (fraction used, setting)
for i, setting in enumerate(settings):
    path = os.path.join(folder, f"{i}.jsonl")
    for line in open(path) if os.path.exists(path) else ():
        r = json.loads(line)
        key = f"{r['line']} {r['what']}".strip()
        if r["used"] >= worst.get(key, (-1,))[0]:
            worst[key] = (r["used"], setting)
print(f"{'used':>9}  setting{'':32}  comparison (test line, key)")
for key, (used, setting) in sorted(worst.items(), key=lambda kv: -kv[1][0]):
    print(f"{used:9.2e}  {setting:39}  {key}")
PY
exit $status
