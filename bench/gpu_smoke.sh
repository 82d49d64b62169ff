#!/usr/bin/env bash
# GPU smoke test: DDP on every visible GPU, bf16, a ResNet-50 + BERT-base-sized fusion model, trained
# through the real `mmray train` CLI on generated data; prints rows/s per epoch.
#
#   bash bench/gpu_smoke.sh                 # ROWS=8000 EPOCHS=2
#   ROWS=20000 EPOCHS=3 bash bench/gpu_smoke.sh
#
# Self-contained and offline: it generates the data, trains a WordPiece tokenizer on it and writes a
# randomly initialised BERT-base (12 layers, 768 wide, 110M parameters) to a local directory, so
# nothing is downloaded. ResNet-50 is built from torchvision without weights. Needs a Python with
# torch (CUDA), ray[data,train], transformers and mmray importable (`pip install -e .`); set PYTHON to
# pick one (default: .venv/bin/python if present, else python3). Record results in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
ROWS=${ROWS:-8000}
EPOCHS=${EPOCHS:-2}
BATCH=${BATCH:-64}          # per GPU
WORK=${WORK:-$(mktemp -d /tmp/mmray-gpu-smoke.XXXXXX)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_DATA_DISABLE_PROGRESS_BARS=1

"$PYTHON" - <<'EOF' || { echo "gpu_smoke: this Python lacks torch/ray/transformers/mmray" >&2; exit 2; }
import ray, torch, transformers, torchvision, mmray  # noqa: F401
EOF
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then echo "gpu_smoke: no CUDA device visible" >&2; exit 2; fi
NCPU=$(nproc)
# CPUs: one per preprocessing actor (half the machine), 2 per trainer worker, the rest for Ray Data's
# read tasks; never more than the machine has.
ACTORS=$(( NCPU / 2 > 1 ? NCPU / 2 : 1 ))
WORKER_CPUS=$(( (NCPU - ACTORS - 1) / NGPU > 2 ? 2 : ((NCPU - ACTORS - 1) / NGPU > 0 ? (NCPU - ACTORS - 1) / NGPU : 1) ))
echo "gpu_smoke: $NGPU GPU(s), $NCPU CPUs, $ROWS rows, $EPOCHS epochs, batch $BATCH/GPU, work dir $WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

"$PYTHON" -m mmray.cli make-data "$WORK/data" --rows "$ROWS" --seed 0 | tail -n 1

# A BERT-base-sized encoder with random weights plus a tokenizer trained on the data, in one HF dir.
"$PYTHON" - "$WORK" <<'EOF'
import sys

import pyarrow.dataset as pads
from transformers import BertConfig, BertModel

from mmray.data.text import train_wordpiece

work = sys.argv[1]
texts = pads.dataset(f"{work}/data/train", format="parquet").to_table(columns=["text"]).column("text").to_pylist()
tokenizer = train_wordpiece(texts, vocab_size=8000, out_dir=f"{work}/bert")
model = BertModel(BertConfig(vocab_size=max(30522, len(tokenizer))))  # bert-base-uncased's shape
model.save_pretrained(f"{work}/bert")
print(f"gpu_smoke: BERT-base-sized encoder, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
EOF

START=$(date +%s)
"$PYTHON" -m mmray.cli train --config configs/demo.yaml \
  "data.train=$WORK/data/train" "data.val=$WORK/data/val" \
  "data.image.size=224" "data.text.max_length=128" "data.cache=auto" \
  "data.preprocess={concurrency: $ACTORS, batch_size: 128, num_cpus: 1}" \
  "model.fusion=concat" "model.hidden_dim=512" \
  "model.text_encoder={kind: hf, name: $WORK/bert, pooling: cls}" \
  "model.image_encoder={kind: torchvision, name: resnet50, weights: null}" \
  "train.use_gpu=true" "train.num_workers=$NGPU" "train.resources_per_worker={CPU: $WORKER_CPUS}" \
  "train.precision=bf16" "train.epochs=$EPOCHS" "train.batch_size=$BATCH" "train.prefetch_batches=4" \
  "train.lr=0.0003" "train.encoder_lr=0.00003" "train.storage_path=$WORK/runs" "train.name=gpu-smoke" \
  2>&1 | tee "$WORK/train.log" | grep -E '^\{"run_dir"|mmray:' || true
END=$(date +%s)

RESULT=$(grep -E '^\{"run_dir"' "$WORK/train.log" | tail -n 1)
if [ -z "$RESULT" ]; then echo "gpu_smoke: training failed; log: $WORK/train.log" >&2; tail -n 60 "$WORK/train.log" >&2; exit 1; fi
"$PYTHON" - "$RESULT" "$NGPU" "$((END - START))" <<'EOF'
import json
import sys

result, ngpu, wall = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
with open(f"{result['run_dir']}/history.jsonl") as f:
    history = [json.loads(line) for line in f if line.strip()]
print(f"\ngpu_smoke: {ngpu} GPU(s), bf16, ResNet-50 + BERT-base-sized, concat fusion; `mmray train` wall {wall} s")
print(f"{'epoch':>5} {'rows':>7} {'train s':>8} {'rows/s':>9} {'rows/s/GPU':>10} {'val s':>6} {'val acc':>7} {'GPU GiB':>7}")
for h in history:
    print(f"{h['epoch']:>5} {h['train_rows']:>7} {h['epoch_s']:>8.1f} {h['rows_per_s']:>9.0f} "
          f"{h['rows_per_s'] / ngpu:>10.0f} {h['eval_s']:>6.1f} {h.get('val_accuracy', float('nan')):>7.3f} "
          f"{h.get('max_gpu_mem_gib', float('nan')):>7.1f}")
print("(epoch 0 includes CUDA/cuDNN warm-up; later epochs are the steady-state throughput)")
print(json.dumps({"gpus": ngpu, "rows_per_s": [round(h["rows_per_s"], 1) for h in history],
                  "val_accuracy": history[-1].get("val_accuracy"), "checkpoint": result["checkpoint"]}))
EOF
