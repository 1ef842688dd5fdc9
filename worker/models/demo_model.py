"""The demo's model: a tiny Llama trained for a few seconds on a bundled public-domain text.

A random-weight model emits bytes that never form words, which makes a poor first impression.
This one is trained once (a fixed number of steps from a fixed seed, so every machine builds
the same weights) on `demo_corpus.txt` (fables retold from Aesop's, public domain), half as
plain text and half as chat turns whose replies are passages of it; its replies read as words.
The result is cached: building it again is a no-op.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import torch

from worker.models.tiny import make_tokenizer

CORPUS = Path(__file__).with_name("demo_corpus.txt")
RECIPE = {"version": 1, "vocab_size": 512, "hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2,
          "intermediate": 384, "seq_len": 96, "batch": 16, "steps": 200, "lr": 3e-3, "seed": 0}


def stories(text: str | None = None) -> list[tuple[str, list[str]]]:
    """(title, sentences) for each paragraph of the corpus; the title is its first sentence."""
    text = CORPUS.read_text(encoding="utf-8") if text is None else text
    out = []
    for paragraph in text.split("\n\n"):
        sentences = [s.strip() for s in re.split(r"(?<=[.!?:])\s+", paragraph.strip()) if s.strip()]
        if len(sentences) > 1:
            out.append((sentences[0].rstrip("."), sentences[1:]))
    return out


def _samples(tokenizer, corpus: list[tuple[str, list[str]]], rng: random.Random, seq_len: int) -> list[int]:
    """One training row of seq_len+1 ids: a chat turn (asked for a story, told its start) or a text window."""
    title, sentences = rng.choice(corpus)
    if rng.random() < 0.5:
        passage = " ".join(sentences[:6])
        messages = [{"role": "user", "content": f"Tell me about {title.lower()}."},
                    {"role": "assistant", "content": passage}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    else:
        start = rng.randrange(len(sentences))
        ids = tokenizer(" ".join(sentences[start:start + 6]))["input_ids"]
    ids = list(ids)[: seq_len + 1]
    return ids + [tokenizer.pad_token_id] * (seq_len + 1 - len(ids))


def make_demo_model(out_dir: str | Path, log=print) -> Path:
    """Train (or reuse, when out_dir already holds this recipe's model) the demo model; returns its path."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    out = Path(out_dir)
    stamp = out / "redbatch-demo-recipe.json"
    if stamp.exists() and json.loads(stamp.read_text()) == RECIPE and (out / "config.json").exists():
        return out
    r = RECIPE
    corpus = stories()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out, vocab_size=r["vocab_size"], texts=[" ".join(s) for _, s in corpus])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=r["hidden"], intermediate_size=r["intermediate"],
                         num_hidden_layers=r["layers"], num_attention_heads=r["heads"],
                         num_key_value_heads=r["kv_heads"], max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(r["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=r["lr"], total_steps=r["steps"], pct_start=0.1)
    rng = random.Random(r["seed"])
    started = time.monotonic()
    model.train()
    for step in range(r["steps"]):
        batch = torch.tensor([_samples(tokenizer, corpus, rng, r["seq_len"]) for _ in range(r["batch"])])
        labels = batch[:, 1:].clone()
        labels[labels == tokenizer.pad_token_id] = -100
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == r["steps"] - 1:
            log(f"  training the demo model: step {step + 1}/{r['steps']}, loss {loss.item():.2f}, "
                f"{time.monotonic() - started:.0f} s")
    model.eval()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=[tokenizer.eos_token_id, im_end],
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    stamp.write_text(json.dumps(RECIPE))
    return out
