"""Pretraining configs as values. Flags in experiments/pretrain.py override single fields.

`default` is the README's run: a small Llama 3.1-shaped model (real RoPE theta/scaling and epsilon)
on the embedded Shakespeare + Python corpus, sized to train in about ten minutes on a 2-core CPU.
The paper-scale configs are here so the launch scripts run the real recipe by name.
"""

import dataclasses

from llama_jax import config
from llama_jax.training import optim
from llama_jax.training.pretrain import RunConfig

# A Llama 3.1 8B with every size shrunk: same RoPE (theta 5e5, factor-8 scaling), eps, GQA ratio 2.
# Four layers run unrolled (train step 0.93x of the scanned one; benchmarks/bench_configs.py "small").
SMALL = dataclasses.replace(config.LLAMA31_8B, vocab_size=4096, dim=256, num_layers=4, num_heads=8,
                            num_kv_heads=4, head_dim=32, mlp_dim=768, max_seq_len=8192, scan_layers=False)

CONFIGS = {
    "default": RunConfig(
        model=SMALL,
        optim=optim.OptimizerConfig(peak_lr=2e-3, final_lr=2e-4, warmup_steps=30, total_steps=300),
        run_dir="runs/default", steps=300, batch_size=16, seq_len=256,
        log_every=10, eval_every=100, eval_batches=16, checkpoint_every=100),
    # A few steps of the same pipeline: for smoke tests and the notebook.
    "smoke": RunConfig(
        model=dataclasses.replace(SMALL, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                  mlp_dim=128),
        optim=optim.OptimizerConfig(peak_lr=3e-3, final_lr=3e-4, warmup_steps=5, total_steps=40),
        run_dir="runs/smoke", steps=40, batch_size=8, seq_len=64,
        log_every=10, eval_every=20, eval_batches=4, checkpoint_every=20),
    # A 1.8M-parameter model at 64 tokens: the start of the long-context example
    # (experiments/configs/long_context.py), about three minutes on a 2-core CPU. RoPE theta 1e4 without
    # scaling: with head_dim 32 its frequencies spread over the short distances a 64-token model sees
    # (Llama 3.1's theta 5e5 and factor 8 turn only a few pairs faster than once per 100 positions).
    "longctx_base": RunConfig(
        model=dataclasses.replace(SMALL, dim=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                                  mlp_dim=384, rope_theta=1e4, rope_scaling=None),
        optim=optim.OptimizerConfig(peak_lr=3e-3, final_lr=3e-4, warmup_steps=50, total_steps=1500),
        run_dir="runs/longctx_base", steps=1500, batch_size=16, seq_len=64,
        log_every=250, eval_every=500, eval_batches=16, checkpoint_every=500),
    # The paper's 8B recipe (§3.4): 4M-token batches of 4,096 tokens, peak LR 3e-4, warmup 8,000.
    # Needs a pod and --train_files/--tokenizer pointing at real data and Meta's tokenizer.
    # Saving only the projections' outputs and attending blockwise keeps no [B,K,G,T,S] score matrix
    # for the backward: a v5p compile (experiments/aot_compile.py) at 4 rows per chip needs 64 GiB, where
    # dots_saveable with einsum attention needed 320 GiB of temporaries (tests/training/test_aot.py).
    "llama3.1-8b": RunConfig(
        model=dataclasses.replace(config.LLAMA31_8B, dtype="bfloat16",
                                  remat_policy="dots_with_no_batch_dims_saveable", attention_impl="blockwise"),
        optim=optim.LLAMA3_8B_OPT, run_dir="runs/llama3.1-8b", steps=1_200_000, batch_size=1024,
        seq_len=4096, log_every=10, eval_every=1000, checkpoint_every=1000, sample_prompts=()),
    # Blockwise attention: einsum attention holds each layer's [B,K,G,T,S] fp32 scores while it runs
    # (CPU compile at 1 row per chip on 1,024 chips: 95.0 GiB per device with einsum, 79.5 GiB blockwise).
    "llama3.1-405b": RunConfig(
        model=dataclasses.replace(config.LLAMA31_405B, dtype="bfloat16", remat_policy="full",
                                  attention_impl="blockwise"),
        optim=optim.LLAMA3_405B_OPT, run_dir="runs/llama3.1-405b", steps=1_200_000, batch_size=1024,
        seq_len=4096, log_every=10, eval_every=1000, checkpoint_every=500, sample_prompts=()),
}
