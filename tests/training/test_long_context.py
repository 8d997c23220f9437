"""Long-context stages and annealing end to end at toy scale (a 4-step base run, stages of 64 and 128
tokens, a few steps each): each stage writes its gate, a gate that cannot pass stops the run with
stop_on_gate_failure and is reported otherwise; synthetic retrieval documents are well formed and
deterministic; the annealing continues the base run's AdamW state (float64 AdamW) and its average equals
the float64 mean of its checkpoints and loads as --init_from."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from experiments.configs.pretrain import CONFIGS
from llama_jax.data import retrieval
from llama_jax.errors import ConfigError
from llama_jax.interop import init_from, orbax as orbax_params
from llama_jax.parallel import sharding
from llama_jax.training import annealing, checkpoint, long_context, optim as optim_lib, step as step_lib
from llama_jax.training.pretrain import pretrain


def test_fact_documents_ask_back_their_facts():
  import re
  filler = ["To be, or not to be, that is the question.\n" * 40, "def f(x):\n    return x + 1\n" * 40]
  docs = [retrieval.fact_document(5, i, filler, chars=600, recall=0.0) for i in range(40)]
  assert docs[3] == retrieval.fact_document(5, 3, filler, chars=600, recall=0.0) != docs[4]
  for doc in docs:
    facts = re.findall(r"\nThe (\w+ \w+) is (\d+)\.\n", doc)
    asked = re.findall(r"What is the (\w+ \w+)\? The (\w+ \w+) is (\d+)\.", doc)
    assert 1 <= len(facts) <= 4 and sorted((s, n) for s, _, n in asked) == sorted(facts)
    assert all(a == b for a, b, _ in asked)
    # Every question comes after every fact, and the needle's own subject is never trained on.
    assert doc.index("What is the") > max(doc.index(f"The {s} is {n}.") for s, n in facts)
    assert "secret number" not in doc
  recall = retrieval.fact_document(5, 0, filler, chars=600, recall=1.0)
  half = recall.removeprefix("Remember:\n").split("\nRepeat:\n")[0]
  assert recall == f"Remember:\n{half}\nRepeat:\n{half}\n" and len(half) == 300
  # Number lists: random 3..6-digit numbers to read back, about as many tokens as a text passage.
  listed = retrieval.fact_document(5, 0, filler, chars=600, recall=0.0, numbers=1.0)
  half = listed.removeprefix("Remember:\n").split("\nRepeat:\n")[0]
  assert listed == f"Remember:\n{half}\nRepeat:\n{half}\n" and 75 <= len(half) <= 82
  assert all(n.isdigit() and 3 <= len(n) <= 6 and n[0] != "0" for n in half.split(" "))


def test_fact_sources_fit_in_their_rows(base_run, tmp_path):
  # The packer cuts rows out of concatenated documents, so a document longer than a row is always cut
  # apart (its facts in one row, its questions in the next: nothing to retrieve), and one of length L lies
  # whole in a row about 1 - L/T of the time. A stage's fact documents are a quarter to a whole row, facts
  # and questions included: questions at every distance up to the row. (Failed before: the facts and
  # questions came on top of a row of text, and number lists were 4x longer than asked.)
  from llama_jax.data import tokenizers
  from llama_jax.training import continued
  cfg = _extension(base_run, tmp_path / "ext", retrieval_format="facts", retrieval_docs=60)
  st = long_context.ExtensionStage(seq_len=128, steps=1, batch_size=8)
  run = long_context._stage_run(cfg, 0, st, continued.resolve_data(cfg.run), "orbax:unused", "unused")
  tok = tokenizers.load_tokenizer(base_run.tokenizer)
  docs = [json.loads(line)["text"] for line in open(run.train_files[-1])]
  lengths = np.array([len(tok.encode(d)) for d in docs])
  assert any(d.startswith("Remember:\n") and d[len("Remember:\n")].isdigit() for d in docs)  # number lists
  assert np.mean(lengths <= 128) >= 0.9 and lengths.max() <= 1.3 * 128, lengths  # sized by an estimate
  assert np.mean(lengths >= 128 // 2) >= 0.3, lengths  # long distances too
  assert np.mean(np.clip(1 - lengths / 128, 0, 1)) >= 0.3, lengths


def test_retrieval_documents_are_well_formed_and_deterministic():
  a, b = retrieval.document(7, 3, lines=200), retrieval.document(7, 3, lines=200)
  assert a == b and a != retrieval.document(7, 4, lines=200) and a != retrieval.document(8, 3, lines=200)
  pairs = retrieval.parse(a)
  assert len(pairs) == 200
  first = {}
  for k, v in pairs:
    assert first.setdefault(k, v) == v  # a key asked back has the value it was given
    assert 1000 <= k <= 9999 and 10000 <= v <= 99999
  repeats = len(pairs) - len(first)
  assert 70 <= repeats <= 130  # repeat=0.5 of 199 chances
  # Asked back from anywhere before: some repeats reach back more than half the document.
  where = {}
  far = 0
  for i, (k, _) in enumerate(pairs):
    if k in where and i - where[k] > 100:
      far += 1
    where.setdefault(k, i)
  assert far > 0


@pytest.fixture(scope="module")
def base_run(text_data, tmp_path_factory):
  run = dataclasses.replace(
      CONFIGS["smoke"], run_dir=str(tmp_path_factory.mktemp("base") / "run"),
      train_files=(text_data["train"],), eval_files=(text_data["eval"],), tokenizer=text_data["tokenizer"],
      steps=4, batch_size=8, seq_len=32, checkpoint_every=2, eval_every=4, eval_batches=1, sample_prompts=(),
      data_dir=str(tmp_path_factory.mktemp("data")))
  pretrain(run)
  return run


def _extension(base_run, root, **over):
  template = dataclasses.replace(base_run, run_dir="unused", log_every=1, eval_batches=1)
  cfg = long_context.ExtensionConfig(
      run=template, root_dir=str(root), from_run=base_run.run_dir, retrieval_weight=0.25, retrieval_docs=20,
      stages=(long_context.ExtensionStage(seq_len=64, steps=2, batch_size=8),
              long_context.ExtensionStage(seq_len=128, steps=2, batch_size=8, rope_theta=1e6)),
      gate=long_context.Gate(needle_min=1.01, needle_trials=1, needle_depths=(0.0, 1.0), eval_batches=1))
  return dataclasses.replace(cfg, **over)


def test_stages_gate_and_stop(base_run, tmp_path, capsys):
  root = tmp_path / "ext"
  # A gate that cannot pass (101% retrieval) stops the run after stage 0 with --stop_on_gate_failure.
  with pytest.raises(long_context.GateFailure, match=r"stage 0 \(seq 64\) failed its gate"):
    long_context.extend(_extension(base_run, root, stop_on_gate_failure=True))
  assert os.path.exists(root / "stage_0_64" / "gate.json") and not os.path.exists(root / "stage_1_128")
  assert "gate stage 0 (seq 64): FAILED" in capsys.readouterr().out

  # Without the flag the same command continues (stage 0 is not retrained) and reports each failure.
  gates = long_context.extend(_extension(base_run, root))
  out = capsys.readouterr().out
  assert "=== stage 0" not in out and "=== stage 1: seq 128" in out and "gate stage 1 (seq 128): FAILED" in out
  assert [g["passed"] for g in gates] == [False, False] and [g["seq_len"] for g in gates] == [64, 128]
  assert json.load(open(root / "gates.json")) == gates
  baseline = json.load(open(root / "baseline.json"))["heldout_loss"]
  for i, t in ((0, 64), (1, 128)):
    d = root / f"stage_{i}_{t}"
    g = json.load(open(d / "gate.json"))
    assert os.path.getsize(d / "needle.png") > 0 and json.load(open(d / "needle.json"))["lengths"] == [t]
    assert g["baseline_heldout_loss"] == baseline and np.isfinite(g["heldout_loss"])
    assert g["heldout_rise"] == pytest.approx(g["heldout_loss"] / baseline - 1, rel=1e-12)
    assert 0 <= g["needle_logprob"] <= 1 and 0 <= g["long_row_fraction"] <= 1
    # Each stage is a pretraining run at its shape; the retrieval source has 25% of the token weight.
    rc = json.load(open(d / "run" / "run_config.json"))
    assert (rc["seq_len"], rc["steps"], rc["batch_size"]) == (t, 2, 8)
    assert rc["train_files"][-1].endswith(f"retrieval_kv_{2 * t}tok_20docs_seed0.jsonl")
    assert rc["train_weights"][-1] / sum(rc["train_weights"]) == pytest.approx(0.25, rel=1e-12)
  # Stage 1 starts from stage 0's final params, with its own RoPE theta; stage 0 keeps the model's.
  assert json.load(open(root / "stage_0_64" / "gate.json"))["rope_theta"] == 500_000.0
  assert gates[1]["rope_theta"] == 1e6
  mesh = sharding.make_mesh(fsdp=-1)
  _, final0 = orbax_params.load_params(str(root / "stage_0_64" / "final"), mesh)
  cfg1, start1 = orbax_params.load_params(str(root / "stage_1_128" / "start"), mesh)
  assert cfg1.rope_theta == 1e6
  for a, b in zip(jax.tree.leaves(jax.device_get(final0)), jax.tree.leaves(jax.device_get(start1))):
    np.testing.assert_array_equal(a, b)
  # The retrieval source is a function of its arguments: rewriting it gives the same bytes.
  path = rc["train_files"][-1]
  text = open(path).read()
  os.remove(path)
  from llama_jax.data import tokenizers
  retrieval.write_source(path, tokenizers.load_tokenizer(base_run.tokenizer), tokens_per_doc=256,
                         num_docs=20, seed=0)
  assert open(path).read() == text
  # A gate that can pass does: a 0% needle bar and an unbounded loss rise. The stage has a curriculum:
  # step 1 on retrieval documents half as long, step 2 on the full-length ones, continuing step 1's
  # train state (one schedule over the stage's 2 steps).
  stage = dataclasses.replace(_extension(base_run, root).stages[0], short_docs_steps=1)
  passing = _extension(base_run, tmp_path / "ext2", stages=(stage,),
                       gate=long_context.Gate(needle_min=0.0, heldout_max_rise=1e9, needle_trials=1,
                                              needle_depths=(0.5,), eval_batches=1))
  capsys.readouterr()
  assert [g["passed"] for g in long_context.extend(passing)] == [True]
  d = tmp_path / "ext2" / "stage_0_64"
  assert f"initialized from the train state of {d / 'run_short_docs'} at step 1 (params" in capsys.readouterr().out
  short, full = (json.load(open(d / r / "run_config.json")) for r in ("run_short_docs", "run"))
  assert short["train_files"][-1].endswith("retrieval_kv_64tok_20docs_seed0.jsonl") and short["steps"] == 1
  assert full["train_files"][-1].endswith("retrieval_kv_128tok_20docs_seed0.jsonl") and full["steps"] == 2
  assert short["optim"] == full["optim"] and full["optim"]["total_steps"] == 2
  assert full["init_state_from"] == str(d / "run_short_docs") and full["init_from"] is None
  assert full["seed"] == short["seed"] + 1  # the second part's corpus rows are not the first part's again
  assert checkpoint.saved_steps(str(d / "run_short_docs" / "checkpoints")) == [1]
  assert checkpoint.saved_steps(str(d / "run" / "checkpoints")) == [2]
  with pytest.raises(ConfigError, match=r"stage seq_len=64: short_docs_steps=2 must be in \[0, steps=2\)"):
    _extension(base_run, root, stages=(dataclasses.replace(stage, short_docs_steps=2),))


def _adam_state(state):
  """(mu, nu, count) of the TrainState's AdamW moments."""
  adam = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(x, "mu")]
  assert len(adam) == 1
  return adam[0].mu, adam[0].nu, int(adam[0].count)


def test_anneal_continues_the_run_and_averages_its_checkpoints(base_run, tmp_path):
  template = dataclasses.replace(base_run, run_dir="unused", steps=4, checkpoint_every=1, keep_checkpoints=1)
  cfg = annealing.AnnealConfig(run=template, root_dir=str(tmp_path / "anneal"), from_run=base_run.run_dir,
                               upsample=((base_run.train_files[0], 3.0),))
  out = annealing.anneal(cfg)
  run_dir = tmp_path / "anneal" / "run"
  rc = json.load(open(run_dir / "run_config.json"))
  assert rc["optim"]["decay"] == "linear" and rc["optim"]["final_lr"] == 0.0 and rc["train_weights"] == [3.0]
  # The annealing is the base run's tail: its steps count on from the base's 4, and keep_period keeps
  # every annealing checkpoint (keep_checkpoints=1 alone would keep one).
  ckpt = checkpoint.Checkpointer(str(run_dir / "checkpoints"))
  assert ckpt.all_steps() == [5, 6, 7, 8]
  ckpt.close()
  assert out["averaged"] == ["step 5", "step 6", "step 7", "step 8"]
  assert set(out["heldout_loss"]) == {"start", "last", "average"}
  assert all(np.isfinite(v) for v in out["heldout_loss"].values())
  mesh = sharding.make_mesh(fsdp=-1)
  config, avg = init_from.load_pretrained(f"orbax:{out['average_dir']}", mesh)
  opt = dataclasses.replace(template.optim, decay="linear", final_lr=0.0, total_steps=8, warmup_steps=4)

  def restore(directory, step):
    ckpt = checkpoint.Checkpointer(str(directory))
    try:
      return jax.device_get(ckpt.restore(step_lib.abstract_state(config, opt, mesh), step=step)[0])
    finally:
      ckpt.close()

  base = restore(os.path.join(base_run.run_dir, "checkpoints"), 4)
  states = [restore(run_dir / "checkpoints", s) for s in (5, 6, 7, 8)]
  # The first annealing step is AdamW (float64 here) from the base's moments: m = b1 m4 + (1 - b1) g and
  # v = b2 v4 + (1 - b2) g^2 for the same (clipped) gradient g, bias-corrected at step 5, not 1, and the
  # params move by the peak LR. (Failed before: the annealing started at step 0 from zeroed moments.)
  (m4, v4, c4), (m5, v5, c5) = _adam_state(base), _adam_state(states[0])
  assert (c4, c5) == (4, 5)
  o = template.optim
  decays = optim_lib.weight_decay_mask(o, base.params)
  for p4, p5, a4, a5, b4, b5, d in zip(*(jax.tree.leaves(t) for t in (
      base.params, states[0].params, m4, m5, v4, v5, decays))):
    p4, p5, a4, a5, b4, b5 = (np.asarray(x, np.float64) for x in (p4, p5, a4, a5, b4, b5))
    g = (a5 - o.b1 * a4) / (1 - o.b1)
    np.testing.assert_allclose(b5, o.b2 * b4 + (1 - o.b2) * g**2, rtol=0, atol=1e-4 * b5.max() + 1e-30)
    update = (a5 / (1 - o.b1**5)) / (np.sqrt(b5 / (1 - o.b2**5)) + o.eps) + (o.weight_decay * p4 if d else 0)
    np.testing.assert_allclose(p5, p4 - o.peak_lr * update, rtol=0, atol=1e-6 * np.abs(p4).max())
  # The average is the float64 mean of the four checkpoints' params, and --init_from=orbax: reads it.
  for m, *ps in zip(jax.tree.leaves(jax.device_get(avg)), *(jax.tree.leaves(s.params) for s in states)):
    want = np.mean([p.astype(np.float64) for p in ps], axis=0)
    np.testing.assert_allclose(m, want, rtol=0, atol=1e-7 * max(np.abs(want).max(), 1e-30))
  # Bad starts stop with the flag to fix, before anything is trained.
  with pytest.raises(ConfigError, match=r"--init_state_from=.*: not a pretraining run directory"):
    pretrain(dataclasses.replace(base_run, run_dir=str(tmp_path / "x1"), init_state_from=str(tmp_path)))
  with pytest.raises(ConfigError, match=r"--steps=4: the state of --init_state_from=.* is at step 4"):
    pretrain(dataclasses.replace(base_run, run_dir=str(tmp_path / "x2"), init_state_from=base_run.run_dir))
  with pytest.raises(ConfigError, match=r"--upsample: \['nope'\] are not sources"):
    annealing.anneal(dataclasses.replace(cfg, upsample=(("nope", 2.0),), root_dir=str(tmp_path / "x")))
