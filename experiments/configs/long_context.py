"""Long-context extension, annealing and data-judging configs as values (experiments/long_context.py,
anneal.py, judge_data.py).

`tiny`: the 1.8M-parameter model pretrained at 64 tokens (`pretrain.py --config=longctx_base`), extended
to 8x that length in 3 stages (128, 256, 512) with 60% of the tokens from synthetic retrieval documents in
the needle's form (`facts`: facts planted in corpus text and asked back, passages and number lists to
repeat; data/retrieval.py); the gate asks 90% needle retrieval by log-probability at each stage's length
and the short-context (16x64) held-out loss within 2% of the start's. RoPE theta 1e4 covers 512 positions
(its slowest pair turns once per ~35K); a stage may change theta or the scaling factor (`rope_theta`,
`rope_factor`), as the paper's stages up to 128K do.
"""

import dataclasses

from experiments.configs.pretrain import CONFIGS as PRETRAIN
from llama_jax.training import optim
from llama_jax.training.annealing import AnnealConfig
from llama_jax.training.judging import JudgeConfig
from llama_jax.training.long_context import ExtensionConfig, ExtensionStage, Gate

# The template of the stage runs: the pretraining base's model and data, a constant-ish LR.
_BASE = dataclasses.replace(
    PRETRAIN["longctx_base"], run_dir="unused", log_every=25, eval_batches=8, checkpoint_every=100,
    optim=optim.OptimizerConfig(peak_lr=1e-3, final_lr=1e-4, warmup_steps=10, total_steps=100))

EXTEND = {
    # 2,048 tokens a step; the first stage is the long one: there the model learns to retrieve at all
    # (copying digits after their predecessors, an induction head) on short retrieval documents first
    # (short_docs_steps), then on documents up to a whole row; the later ones stretch the distance.
    # 8,000 retrieval documents: each is seen about 8 times in stage 0 (2,000: ~30, memorizable).
    "tiny": ExtensionConfig(
        run=dataclasses.replace(_BASE, log_every=100), root_dir="runs/longctx", retrieval_weight=0.6,
        retrieval_format="facts", retrieval_docs=8000,
        stages=(ExtensionStage(seq_len=128, steps=4000, batch_size=16, peak_lr=2e-3, short_docs_steps=2500),
                ExtensionStage(seq_len=256, steps=800, batch_size=8),
                ExtensionStage(seq_len=512, steps=800, batch_size=4)),
        gate=Gate(needle_min=0.9, heldout_max_rise=0.02, needle_trials=4, needle_batch=8, eval_batches=8)),
}

ANNEAL = {
    # 100 more steps of the base at its shape, continuing its train state (AdamW moments, step count),
    # the LR from the base's final 3e-4 linearly to 0, Python (code) upsampled 2x as the "high-quality"
    # source, a checkpoint every 20 steps kept and averaged.
    "tiny": AnnealConfig(
        run=dataclasses.replace(_BASE, steps=100, checkpoint_every=20, eval_every=100,
                                optim=dataclasses.replace(_BASE.optim, peak_lr=3e-4, warmup_steps=0)),
        root_dir="runs/anneal", upsample=(("python", 2.0),)),
}

JUDGE = {
    # [P] §3.1.3 at toy scale: from the base's train state, 50 steps LR 3e-4 (where its schedule ended)
    # -> 0 per arm, the candidate at 30% of the tokens and the corpus mix at 70%, against a control on the
    # corpus mix alone.
    # Candidates: --candidates=python,retrieval,path/to/file.jsonl (here: more code, and key-value lists).
    "tiny": JudgeConfig(
        run=dataclasses.replace(_BASE, steps=50, checkpoint_every=25,
                                optim=dataclasses.replace(_BASE.optim, peak_lr=3e-4, warmup_steps=0)),
        root_dir="runs/judge", candidates=("python", "retrieval"), candidate_share=0.3),
}
