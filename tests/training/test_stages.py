"""The paper's batch-size / sequence-length stages and the --stages flag."""

import pytest

from llama_jax.errors import ConfigError
from llama_jax.training import stages as stages_lib


def test_paper_batch_stages():
  stages = stages_lib.LLAMA3_STAGES
  at = lambda tokens: stages_lib.stage_at(tokens, stages)
  assert at(0).tokens_per_batch == 4 * 2**20 and at(0).seq_len == 4096
  assert at(251_999_999) == at(0)
  assert at(252_000_000).tokens_per_batch == 8 * 2**20 and at(252_000_000).seq_len == 8192
  assert at(2_869_999_999_999).seq_len == 8192 and at(2_869_999_999_999).batch_size == 1024
  assert at(2_870_000_000_000).tokens_per_batch == 16 * 2**20
  assert at(15_600_000_000_000) == stages[-1]
  with pytest.raises(ConfigError, match="--stages"):
    stages_lib.stage_at(0, (stages_lib.Stage(10, 1, 1),))
  with pytest.raises(ConfigError, match="--stages"):
    stages_lib.stage_at(0, (stages_lib.Stage(0, 1, 1), stages_lib.Stage(0, 2, 1)))


def test_stage_start_steps_and_flag_parsing():
  # 252M tokens at 2^22 per batch: 60.08 batches, so the 8K stage runs from the 62nd step on.
  starts = stages_lib.stage_start_steps(stages_lib.LLAMA3_STAGES)
  assert starts[:2] == [0, 61]
  tokens_at_2 = 61 * 2**22 + (starts[2] - 61) * 2**23
  assert tokens_at_2 >= 2_870_000_000_000 > tokens_at_2 - 2**23
  assert stages_lib.parse_stages(["0:1024x4096", "252e6:1024x8192", "2.87e12:2048x8192"]) == stages_lib.LLAMA3_STAGES
  with pytest.raises(ConfigError, match="--stages: '0:16' is not"):
    stages_lib.parse_stages(["0:16"])
