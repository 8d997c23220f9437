"""The models the benchmarks run, by name: (ModelConfig, global batch, sequence length), float32.

  tiny  the `tiny` preset (what most of the suite runs), 8 × 256
  small the default `bash run.sh` model (experiments/configs/pretrain.py SMALL: 4 layers, D 256, 8 / 4
        heads, F 768, V 4096), 16 × 256 as that run
  45m   the peer comparison's model (benchmarks/vs_maxtext.py CONFIG): Llama 3 (no RoPE scaling), 4 layers,
        D 512, 8 query / 4 KV heads (H 64), F 1536, V 32000, untied — 45.4M parameters, 8 × 512. Its
        output layer holds 36% of the weights and more than half the matmul FLOPs.
  100m  GPT-2-small widths on the Llama 3.2 recipe (tied, GQA, RoPE scaling): 12 layers, D 768, 12 / 4
        heads, F 2048, V 32000 — 109M parameters, 4 × 256, layers unrolled
"""

import dataclasses

from llama_jax import config as C

CONFIGS = {
    "tiny": (C.TINY, 8, 256),
    "small": (dataclasses.replace(C.LLAMA31_8B, vocab_size=4096, dim=256, num_layers=4, num_heads=8,
                                  num_kv_heads=4, head_dim=32, mlp_dim=768, max_seq_len=8192,
                                  scan_layers=False), 16, 256),
    "45m": (dataclasses.replace(C.LLAMA3_8B, vocab_size=32_000, dim=512, num_layers=4, num_heads=8,
                                num_kv_heads=4, head_dim=64, mlp_dim=1536, max_seq_len=2048,
                                tie_embeddings=False, scan_layers=False), 8, 512),
    # Layers unrolled, as for the smaller models: on CPU the 12-layer scan's per-layer slices and
    # updates of the stacked buffers cost more than the loop saves (profile_step.py --config=100m
    # --set=scan_layers=...: step 5.04 / 5.04 s unrolled vs 5.27 / 5.14 s scanned, idle 0.28 vs 0.48 s).
    "100m": (dataclasses.replace(C.LLAMA32_1B, vocab_size=32_000, dim=768, num_layers=12, num_heads=12,
                                 num_kv_heads=4, head_dim=64, mlp_dim=2048, max_seq_len=2048,
                                 scan_layers=False), 4, 256),
}
