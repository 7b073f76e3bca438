#!/usr/bin/env bash
# Issue 15 item 5: why UMTAM r=8 trails AdamW on CoLA. Each hypothesis is a named variant of the
# UMTAM expert at its holdout-chosen lr (1e-4), three seeds, never chosen by the lr selection;
# bench/experts.py --report lists them beside the plain runs. Results: bench/results/experts/.
#   the 1-D AdamW fallback's rate: UMTAM steps biases and LayerNorm at its own 1e-4, AdamW's
#     whole model runs at 5e-5            -> --set dense_lr=5e-05
#   warm-up (recipe: 6% of the steps)     -> --set warmup_ratio=0, --set warmup_ratio=0.15
#   what the rank-8 momentum drops        -> --ranks 32,64
#   error feedback of the dropped part    -> --error-feedback
#   the momentum's beta (0.9)             -> --set beta1=0.8, --set beta1=0.95
#   the factored second moment alone      -> --ranks 384 --dense-embeddings: at full rank the momentum is
#     the dense EMA (test_full_rank_momentum_is_the_dense_ema), the embeddings get AdamW; what is left
#     against AdamW is the encoder's factored second moment. About 3.6 s a step on one thread (45 minutes a run).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${SEEDS:-42,43,44}
common=(--tasks cola --optimizers umtam --lrs umtam=1e-4 --seeds "$seeds")
python bench/experts.py "${common[@]}" --set dense_lr=5e-05
python bench/experts.py "${common[@]}" --set warmup_ratio=0
# and AdamW without warm-up: a gain both optimizers get would not explain UMTAM's gap
python bench/experts.py --tasks cola --optimizers adamw --lrs adamw=5e-5 --seeds "$seeds" --set warmup_ratio=0
python bench/experts.py "${common[@]}" --set warmup_ratio=0.15
python bench/experts.py "${common[@]}" --ranks 32,64
python bench/experts.py "${common[@]}" --error-feedback
python bench/experts.py "${common[@]}" --set beta1=0.8
python bench/experts.py "${common[@]}" --set beta1=0.95
python bench/experts.py --tasks cola --optimizers umtam --lrs umtam=1e-4 --seeds 42,43,44 --ranks 384 --dense-embeddings
