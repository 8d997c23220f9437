"""data/instruct.build_sets: reproducible bytes, train/held-out from disjoint documents, files the
post-training readers accept."""

import json

from llama_jax.data import chat, instruct, posttrain, tokenizers


def _corpus(tmp_path):
  """Two sources, each with train and held-out documents whose lines name their document."""
  files = {}
  for split, docs in (("train", range(0, 6)), ("heldout", range(6, 8))):
    files[split] = {}
    for src in ("python", "shakespeare"):
      path = tmp_path / f"{src}_{split}.jsonl"
      with open(path, "w") as f:
        for d in docs:
          text = "".join(f"{src} doc{d} line {i}: some words here\n" for i in range(40))
          f.write(json.dumps({"id": f"{src}{d}", "text": text}) + "\n")
      files[split][src] = str(path)
  return files


def test_build_sets_reproducible_disjoint_readable(tmp_path):
  files = _corpus(tmp_path)
  kw = dict(seed=3, n_train=12, n_heldout=6, prompt_chars=80, response_chars=40)
  a = instruct.build_sets(files["train"], files["heldout"], str(tmp_path / "a"), **kw)
  b = instruct.build_sets(files["train"], files["heldout"], str(tmp_path / "b"), **kw)
  c = instruct.build_sets(files["train"], files["heldout"], str(tmp_path / "c"), **{**kw, "seed": 4})
  for name in instruct.FILES:
    assert open(a[name], "rb").read() == open(b[name], "rb").read(), name
  assert open(a["pref_train"], "rb").read() != open(c["pref_train"], "rb").read()

  def docs_of(path):
    text = open(path).read()
    return {f"doc{d}" for d in range(8) if f"doc{d} " in text}

  assert docs_of(a["sft_train"]) <= {f"doc{d}" for d in range(6)}
  assert docs_of(a["sft_heldout"]) <= {"doc6", "doc7"} and docs_of(a["sft_heldout"])
  for line in open(a["pref_heldout"]):
    r = json.loads(line)
    assert r["chosen"] != r["rejected"]
    src = "python" if "python doc" in r["prompt"] else "shakespeare"
    assert src not in r["rejected"]  # the rejected continuation is the other source's

  # The post-training readers accept every line (a chat-token tokenizer over the two sources' text).
  text = tmp_path / "text.txt"
  text.write_text("".join(json.loads(l)["text"] for p in files["train"].values() for l in open(p)))
  tok = tokenizers.train_sentencepiece([str(text)], str(tmp_path / "tok"), 300, chat_tokens=True)
  fmt = chat.ChatFormat.for_tokenizer(tok)
  dialogs, reports = posttrain.read_sft([a["sft_train"], a["sft_heldout"]], tok, fmt, seq_len=512)
  pairs, _ = posttrain.read_preferences([a["pref_train"], a["pref_heldout"]], tok, fmt, seq_len=512)
  assert [r.kept for r in reports] == [12, 6] and len(pairs) == 18
  first = json.loads(open(a["sft_train"]).readline())["messages"]
  assert first[1]["content"] in tok.decode(dialogs[0].ids)  # the true continuation is the answer
  assert sum(1 for _ in open(a["prompts_heldout"])) == 6
