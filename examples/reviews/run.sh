#!/usr/bin/env bash
# The README's "Your own data" example end to end: your task's files, fine-tuning, a ProDistill merge
# with the demo's QQP and QNLI experts, evaluation. Outputs stay in this folder (git-ignored).
set -euo pipefail
cd "$(dirname "$0")"
python make_data.py
# The demo fine-tunes (or finds cached) MiniLM experts and prints the folders of the base and experts.
layermerge demo -q > demo.txt
BASE=$(sed -n 's/^base: //p' demo.txt)
QQP=$(sed -n 's/^expert qqp: //p' demo.txt)
QNLI=$(sed -n 's/^expert qnli: //p' demo.txt)
# Your own expert, with the demo's recipe; prints its folder (cached by a hash of everything that made it).
REVIEWS=$(layermerge finetune "$BASE" --task task.yaml --max-train-examples 2000 --epochs 1 --lr 1e-4 \
          --max-length 64 -q)
cat > merge.yaml <<YAML
base: $BASE
experts: {reviews: $REVIEWS, qqp: $QQP, qnli: $QNLI}
method: prodistill
params: {epochs: 20}
data:
  shots: 16
  max_length: 64
  tasks: {reviews: task.yaml}      # qqp and qnli are built-in tasks of those names
YAML
rm -rf merged
layermerge merge merge.yaml -o merged -q
layermerge eval merged --experts "reviews=$REVIEWS,qqp=$QQP,qnli=$QNLI" --max-examples 250 --max-length 64 -q
