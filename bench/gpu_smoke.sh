#!/usr/bin/env bash
# GPU smoke check of the toy lab on CUDA: the demo preset with TrOPD and OPD, every objective for a few
# steps, and tropd evaluate, all with train.device=cuda. Prints wall times and peak GPU memory.
# Usage (on a CUDA machine with torch and transformers installed): bash bench/gpu_smoke.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/tropd-gpu}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
tropd() { python3 -m tropd_cli "$@"; }
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
for objective in tropd opd; do
  /usr/bin/time -f "$objective demo wall %es" python3 -m tropd_cli distill --preset toylab --set train.device=cuda \
    --set objective.name=$objective --out "$out/demo-$objective" --overwrite 2>&1 | tail -12
done
for setting in objective.name=eopd objective.name=reopold objective.name=entropy_opd objective.name=gkd \
               objective.name=fkl_topk objective.outlier=mask objective.outlier=clip objective.outlier=fkl_grad \
               train.updates_per_batch=2; do
  name=${setting//[=.]/-}
  tropd distill --preset toylab --set train.device=cuda --set train.steps=5 --set eval.problems=0 \
    --set "$setting" --out "$out/$name" --overwrite > "$out/$name.log" 2>&1
  echo "$setting: exit $? $(tail -n 1 "$out/$name/metrics.jsonl" 2>/dev/null | cut -c1-160)"
done
/usr/bin/time -f "evaluate wall %es" python3 -m tropd_cli evaluate --model toylab:teacher --model "$out/demo-tropd" \
  --benchmark toylab --device cuda --out "$out/eval" --overwrite 2>&1 | tail -12
python3 - "$out" <<'PY'
import json, sys, pathlib
for run in sorted(pathlib.Path(sys.argv[1]).glob("demo-*")):
    s = json.loads((run / "summary.json").read_text())
    print(run.name, {k: s.get(k) for k in ("student_accuracy_before", "student_accuracy_after", "train_seconds")})
PY
