"""Post-training data: JSONL validation line by line, SFT rows of whole dialogs, preference pairs [B, 2, T]
per the issue-10 contract, determinism and resume, the ref_logp scoring hook. A SentencePiece model with
the chat tokens appended (hermetic: trained on a stdlib file in a fixture)."""

import json
import os
import sysconfig

import numpy as np
import pytest

from llama_jax.data import chat, posttrain as pt, stream, tokenizers as tk
from llama_jax.errors import ConfigError

U = lambda s: {"role": "user", "content": s}  # noqa: E731
A = lambda s, **kw: {"role": "assistant", "content": s, **kw}  # noqa: E731
SYSTEM = {"role": "system", "content": "Answer in one line."}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  src = os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")
  return tk.train_sentencepiece([src], str(tmp_path_factory.mktemp("spm") / "m"), 512).with_chat_tokens()


@pytest.fixture(scope="module")
def fmt(tok):
  return chat.ChatFormat.for_tokenizer(tok)


def _write(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def _dialogs(n):
  """n dialogs of varied lengths and shapes (system or not, one or two turns, a tool call)."""
  out = []
  for i in range(n):
    d = [SYSTEM] if i % 3 == 0 else []
    d += [U(f"question {i}: " + "why " * (i % 5)), A(f"answer {i}." + " because" * (i % 4))]
    if i % 4 == 1:
      d += [U("and then?"), A("call tool", eom=True, python_tag=True), {"role": "ipython", "content": "42"},
            A(f"then {i}.")]
    out.append(d)
  return out


def _trained_text(dialog):
  """What SFT learns of a dialog, written out by hand: each assistant content and its terminator."""
  return "".join(("<|python_tag|>" if m.get("python_tag") else "") + m["content"].strip()
                 + ("<|eom_id|>" if m.get("eom") else "<|eot_id|>") for m in dialog if m["role"] == "assistant")


# --- validation ---------------------------------------------------------------------------------------

SFT_BAD = [  # (line, what the message says)
    ('{"messages": [', "not JSON (Expecting value at column 15); write one JSON object per line"),
    ('[1, 2]', "a JSON list, not an object"),
    ({"text": "hi"}, "no 'messages' field; every line needs 'messages'"),
    ({"messages": "hi"}, "'messages' is a str, not a list of messages"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [U("hi"), {"role": "bot", "content": "x"}]}, "message role 'bot' is not one of"),
    ({"messages": [U("hi"), A("  ")]}, "assistant message content is empty; drop the message or give it text"),
    ({"messages": [U("hi"), A(7)]}, "assistant message content is int, not a string"),
    ({"messages": [U("hi"), {"role": "assistant", "text": "x"}]}, r"unknown keys ['text']"),
    ({"messages": [U("hi", ), A("x", eom=1)]}, "message 'eom' is 1, not true/false"),
    ({"messages": [U("hi")]}, "has no assistant message, so nothing is learned"),
    ({"messages": [U("hi"), A("word " * 80)]}, "the dialog is "),  # the count below
]


def test_sft_bad_lines(tmp_path, tok, fmt, capsys):
  good = _dialogs(3)
  rows = [{"messages": good[0]}]
  for line, _ in SFT_BAD:
    rows += [line, ""]  # blank lines are ignored, not bad
  rows += [{"messages": good[1], "id": "extra keys at the top are ignored"}, {"messages": good[2]}]
  path = _write(tmp_path / "sft.jsonl", rows)
  dialogs, (report,) = pt.read_sft(path, tok, fmt, seq_len=128, on_bad_line="skip")
  assert report.kept == len(dialogs) == 3 and len(report.skipped) == len(SFT_BAD)
  for k, (msg, (_, want)) in enumerate(zip(report.skipped, SFT_BAD)):
    assert msg.startswith(f"{path}:{2 + 2 * k}: ") and want in msg, (msg, want)
  n = len(chat.render(tok, fmt, SFT_BAD[-1][0]["messages"]))
  assert report.skipped[-1].endswith(
      f"the dialog is {n} tokens, longer than the row (--seq_len=128); raise --seq_len or shorten the dialog.")
  err = capsys.readouterr().err
  assert f"skipped {len(SFT_BAD)} bad lines, kept 3 (--on_bad_line=skip)" in err
  assert err.count("skipped ") == len(SFT_BAD) + 1  # one line per bad line, then the count
  # Kept dialogs are exactly the good ones, in file order.
  for r, d in zip(dialogs, good):
    assert np.array_equal(r.ids, chat.render(tok, fmt, d).ids)
  with pytest.raises(ConfigError, match=rf"^{path}:2: not JSON \(Expecting value at column 15\); write one "
                                         r"JSON object per line. \(--on_bad_line=skip drops such lines\)$"):
    pt.read_sft(path, tok, fmt, seq_len=128, on_bad_line="fail")
  with pytest.raises(ConfigError, match="--on_bad_line='drop': use 'fail' or 'skip'"):
    pt.read_sft(path, tok, fmt, seq_len=128, on_bad_line="drop")
  bad_only = _write(tmp_path / "bad.jsonl", ["{", "{"])
  with pytest.raises(ConfigError, match=r"--sft_files: '.*bad.jsonl' has no usable lines \(2 bad\)"):
    pt.read_sft(bad_only, tok, fmt, seq_len=128, on_bad_line="skip")
  (tmp_path / "latin1.jsonl").write_bytes(b'{"messages": "caf\xe9"}\n')
  with pytest.raises(ConfigError, match=r"latin1.jsonl:1: not UTF-8 \(byte 0xe9 at column 18\)"):
    pt.read_sft(str(tmp_path / "latin1.jsonl"), tok, fmt, seq_len=128)


PREF_BAD = [
    ({"prompt": "q", "chosen": "a"}, "no 'rejected' field"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' is a int; write a string or a list of messages"),
    ({"prompt": "q", "chosen": [A("a"), U("b")], "rejected": "b"},
     "'chosen' ends with a user message; a response ends with the assistant's"),
    ({"prompt": "q", "chosen": "a", "rejected": None}, "'rejected' is a NoneType"),
    ({"prompt": "q", "chosen": " same", "rejected": A("same ")}, "'chosen' and 'rejected' are the same tokens"),
    ({"prompt": [U("q"), {"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"},
     "message role 'tool' is not one of"),
    ({"prompt": "q", "chosen": "a", "rejected": "word " * 80}, "prompt + rejected is "),
]


def test_preference_bad_lines(tmp_path, tok, fmt):
  good = {"prompt": "q", "chosen": "a", "rejected": "b"}
  path = _write(tmp_path / "pref.jsonl", [good] + [line for line, _ in PREF_BAD] + [good])
  pairs, (report,) = pt.read_preferences(path, tok, fmt, seq_len=128, on_bad_line="skip")
  assert len(pairs) == report.kept == 2 and len(report.skipped) == len(PREF_BAD)
  for k, (msg, (_, want)) in enumerate(zip(report.skipped, PREF_BAD)):
    assert msg.startswith(f"{path}:{2 + k}: ") and want in msg, (msg, want)
  with pytest.raises(ConfigError, match=rf"^{path}:2: no 'rejected' field; every line needs 'rejected'."):
    pt.read_preferences(path, tok, fmt, seq_len=128)


# --- SFT rows -----------------------------------------------------------------------------------------

def test_sft_packing(tmp_path, tok, fmt):
  good = _dialogs(11)
  path = _write(tmp_path / "sft.jsonl", [{"messages": d} for d in good])
  dialogs, _ = pt.read_sft(path, tok, fmt, seq_len=160)
  s = pt.SFTStream(dialogs, seed=0, pad_id=tok.pad_id, shuffle=False)
  batches = [s.next_batch(3, 160) for _ in range(3)]
  b = batches[0]
  assert set(b) == {*stream.FEATURES, "source_id"}
  assert all(b[k].shape == (3, 160) and b[k].dtype == np.int32 for k in stream.FEATURES)
  # Walk the rows: each segment is one whole dialog (from its BOS, positions from 0), in file order.
  learned, d = [], 0
  for b in batches:
    for r in range(3):
      seg = b["segment_ids"][r]
      real = seg > 0  # dialogs first, in segment order, then padding
      assert real[:real.sum()].all() and np.all(np.diff(seg[real]) == np.diff(seg[real]).clip(0, 1))
      for k in range(1, seg.max() + 1):
        at = np.flatnonzero(seg == k)
        want = dialogs[d % len(dialogs)]
        assert np.array_equal(b["inputs"][r, at], want.ids) and np.array_equal(b["positions"][r, at],
                                                                               np.arange(len(at)))
        assert np.array_equal(b["targets"][r, at[:-1]], want.ids[1:]) and b["loss_mask"][r, at[-1]] == 0
        learned.append(tok.decode(b["targets"][r, at][b["loss_mask"][r, at] == 1]))
        d += 1
      pad = seg == 0
      assert np.all(b["inputs"][r, pad] == tok.pad_id) and not b["loss_mask"][r, pad].any()
      # First-fit: the next dialog would not have fit in what is left of the row.
      assert pad.sum() < len(dialogs[d % len(dialogs)])
  assert d > len(dialogs)  # into the second epoch
  # The loss-masked targets are exactly each dialog's assistant contents and terminators.
  assert learned == [_trained_text(good[i % len(good)]) for i in range(d)]


def test_sft_determinism_and_resume(tmp_path, tok, fmt):
  path = _write(tmp_path / "sft.jsonl", [{"messages": d} for d in _dialogs(9)])
  dialogs, _ = pt.read_sft(path, tok, fmt, seq_len=160)
  run = lambda seed: pt.SFTStream(dialogs, seed=seed, pad_id=tok.pad_id).batches(2, 160)  # noqa: E731
  a, b = run(5), run(5)
  first = [next(a) for _ in range(4)]
  for x in first:
    y = next(b)
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert not np.array_equal(first[0]["inputs"], next(run(6))["inputs"])  # the seed shuffles
  state = json.loads(json.dumps(a.get_state()))  # saved as JSON, like the pretraining stream's
  assert state == {"version": 1, "epoch": state["epoch"], "index": state["index"], "examples": 9}
  want = [next(a) for _ in range(3)]
  resumed = run(5)
  resumed.set_state(state)
  for x in want:
    y = next(resumed)
    assert all(np.array_equal(x[k], y[k]) for k in x)
  # A process filling only its rows gets the same rows.
  part = pt.SFTStream(dialogs, seed=5, pad_id=tok.pad_id)
  part.set_state(state)
  got = part.next_batch(2, 160, rows=[1])
  assert np.array_equal(got["inputs"][1], want[0]["inputs"][1]) and not got["segment_ids"][0].any()
  with pytest.raises(ConfigError, match="does not fit this run's 8 examples; resume with the same --sft_files"):
    pt.SFTStream(dialogs[:8], seed=5, pad_id=tok.pad_id).set_state(state)
  with pytest.raises(ConfigError, match=r"SFT dialog \d+ is \d+ tokens, longer than the row \(--seq_len=8\)"):
    pt.SFTStream(dialogs, seed=5, pad_id=tok.pad_id).next_batch(2, 8)


# --- preference rows ----------------------------------------------------------------------------------

PAIRS = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, probably."},
    {"prompt": [SYSTEM, U("2+2?")], "chosen": A("4"), "rejected": [A("5")]},
    {"prompt": "Weather?", "chosen": [A("search", python_tag=True, eom=True),
                                      {"role": "ipython", "content": "sunny"}, A("Sunny.")],
     "rejected": "No idea."},
]


def _response_text(r):
  """What response_mask marks, written out by hand: each assistant message of the response, whole."""
  msgs = [A(r)] if isinstance(r, str) else [r] if isinstance(r, dict) else r
  return "".join("<|start_header_id|>assistant<|end_header_id|>\n\n" + _trained_text([m])
                 for m in msgs if m["role"] == "assistant")


def test_preference_rows(tmp_path, tok, fmt):
  path = _write(tmp_path / "pref.jsonl", PAIRS)
  pairs, _ = pt.read_preferences(path, tok, fmt, seq_len=72)
  s = pt.PreferenceStream(pairs, seed=0, pad_id=tok.pad_id, shuffle=False)
  b = s.next_batch(4, 72)  # the 4th pair is the first again (next epoch)
  assert set(b) == {*pt.PREFERENCE_FEATURES, "pair_index"}
  for k in ("inputs", "targets", "segment_ids", "positions", "response_mask", "format_mask"):
    assert b[k].shape == (4, 2, 72) and b[k].dtype == (np.float32 if k.endswith("_mask") else np.int32)
  assert b["last_index"].shape == (4, 2) and b["last_index"].dtype == np.int32
  assert b["pair_index"].tolist() == [0, 1, 2, 0]
  for i, line in enumerate(PAIRS):
    p = pairs[i]
    prompt = chat.render(tok, fmt, pt._prompt_messages(line["prompt"], fmt))
    n = len(prompt)
    assert p.prompt_len == n
    for c, key in enumerate(("chosen", "rejected")):
      x = getattr(p, key)
      k = len(x)
      # The same prompt tokens open both rows; the row is the whole dialog rendered at once.
      assert np.array_equal(b["inputs"][i, c, :n], prompt.ids)
      whole = chat.render(tok, fmt, pt._prompt_messages(line["prompt"], fmt)
                          + pt._response_messages(line[key], key, fmt))
      assert np.array_equal(b["inputs"][i, c, :k], whole.ids)
      assert b["last_index"][i, c] == k - 1 and b["inputs"][i, c, k - 1] == tok.eot_id
      assert b["segment_ids"][i, c].tolist() == [1] * k + [0] * (72 - k)
      assert b["positions"][i, c, :k].tolist() == list(range(k)) and not b["positions"][i, c, k:].any()
      assert np.array_equal(b["targets"][i, c, :k - 1], whole.ids[1:])
      assert np.all(b["inputs"][i, c, k:] == tok.pad_id)
      resp, form = b["response_mask"][i, c] == 1, b["format_mask"][i, c] == 1
      assert not resp[k - 1:].any() and not form[k - 1:].any() and not resp[:n - 1].any()
      assert tok.decode(b["targets"][i, c, resp]) == _response_text(line[key])
      # format: every header and terminator of the dialog (BOS is never a target).
      roles = [(m["role"], "<|eom_id|>" if m.get("eom") else "<|eot_id|>") for m in
               pt._prompt_messages(line["prompt"], fmt) + pt._response_messages(line[key], key, fmt)]
      assert tok.decode(b["targets"][i, c, form]) == "".join(
          f"<|start_header_id|>{r}<|end_header_id|>\n\n{e}" for r, e in roles)
      # The DPO term's tokens (response, not format): the assistant contents of the response.
      content = resp & ~form
      assert tok.decode(b["targets"][i, c, content]) == _response_text(line[key]).replace(
          "<|start_header_id|>assistant<|end_header_id|>\n\n", "").replace("<|eot_id|>", "").replace(
              "<|eom_id|>", "")
  assert all(np.array_equal(b[k][3], b[k][0]) for k in pt.PREFERENCE_FEATURES)


def test_preference_resume_epoch_and_ref_logp(tmp_path, tok, fmt):
  path = _write(tmp_path / "pref.jsonl", PAIRS * 3)
  pairs, _ = pt.read_preferences(path, tok, fmt, seq_len=72)
  a = pt.PreferenceStream(pairs, seed=1, pad_id=tok.pad_id).batches(2, 72)
  next(a)
  state = json.loads(json.dumps(a.get_state()))
  want = [next(a) for _ in range(5)]  # crosses an epoch (9 pairs)
  r = pt.PreferenceStream(pairs, seed=1, pad_id=tok.pad_id).batches(2, 72)
  r.set_state(state)
  for x in want:
    y = next(r)
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert sorted(np.concatenate([w["pair_index"] for w in want])[:8].tolist()) != list(range(8))  # shuffled
  # One pass in file order, padded with an empty pair; the stream's state is left alone.
  s = pt.PreferenceStream(pairs, seed=1, pad_id=tok.pad_id)
  ep = list(s.in_file_order(4, 72))
  assert [e["pair_index"].tolist() for e in ep] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, -1, -1, -1]]
  assert not ep[2]["segment_ids"][1:].any() and not ep[2]["response_mask"][1:].any()
  assert s.get_state() == s.initial_state()

  # The scoring hook: ref_logp [B, C] from a score(batch) function, the state passed through.
  def score(batch):  # a stand-in for the reference model: the summed DPO-term mask
    return (batch["response_mask"] * (1 - batch["format_mask"])).sum(-1)

  scored = pt.with_ref_logp(pt.PreferenceStream(pairs, seed=1, pad_id=tok.pad_id).batches(2, 72), score)
  scored.set_state(state)
  x = next(scored)
  assert x["ref_logp"].dtype == np.float32 and x["ref_logp"].shape == (2, 2)
  assert np.array_equal(x["ref_logp"], score(want[0])) and np.array_equal(x["inputs"], want[0]["inputs"])
  ref = pt.PreferenceStream(pairs, seed=1, pad_id=tok.pad_id)
  ref.set_state(state)
  ref.next_batch(2, 72)
  assert scored.get_state() == ref.get_state() != state
  # Or the scoring pass once over all pairs, looked up by pair_index (0 on padding pairs).
  table = pt.ref_logp_table(s, score, 4, 72)
  assert table.shape == (9, 2) and np.array_equal(table[:4], score(ep[0]))
  looked_up = pt.with_ref_logp(pt.PreferenceStream(pairs, seed=1, pad_id=tok.pad_id).batches(2, 72),
                               table=table)
  looked_up.set_state(state)
  assert np.array_equal(next(looked_up)["ref_logp"], x["ref_logp"])
  padded = pt.with_ref_logp(iter(ep), table=table)
  assert [next(padded) for _ in range(3)][2]["ref_logp"].tolist() == [table[8].tolist()] + [[0, 0]] * 3
  with pytest.raises(ConfigError, match="give either score= .* or table="):
    pt.with_ref_logp(iter(ep))
  bad = pt.with_ref_logp(pt.PreferenceStream(pairs, seed=1, pad_id=tok.pad_id).batches(2, 72),
                         lambda b: np.zeros(2))
  with pytest.raises(ConfigError, match=r"ref_logp of shape \(2,\), not \[B, C\] = \(2, 2\)"):
    next(bad)


def test_sft_files_and_held_out_pass(tmp_path, tok, fmt):
  """Several files are one list in the order given; the held-out pass packs each dialog once in that
  order, the last batch padded with empty rows, and leaves the stream's state alone."""
  good = _dialogs(7)
  a = _write(tmp_path / "a.jsonl", [{"messages": d} for d in good[:3]])
  b = _write(tmp_path / "b.jsonl", [{"messages": d} for d in good[3:]])
  dialogs, reports = pt.read_sft([a, b], tok, fmt, seq_len=160)
  assert [(r.path, r.kept, r.skipped) for r in reports] == [(a, 3, []), (b, 4, [])]
  s = pt.SFTStream(dialogs, seed=0, pad_id=tok.pad_id)
  batches = list(s.in_file_order(2, 160))
  assert s.get_state() == s.initial_state()
  learned = [tok.decode(x["targets"][r][(x["segment_ids"][r] == k) & (x["loss_mask"][r] == 1)])
             for x in batches for r in range(2) for k in range(1, x["segment_ids"][r].max() + 1)]
  assert learned == [_trained_text(d) for d in good]
  rows = len(list(s.in_file_order(1, 160)))  # one row per batch: no padding rows
  (one,) = s.in_file_order(rows + 1, 160)
  assert one["source_id"].tolist() == [0] * rows + [-1]
  assert not one["segment_ids"][-1].any() and not one["loss_mask"][-1].any()
  assert np.array_equal(one["inputs"][:2], batches[0]["inputs"])
