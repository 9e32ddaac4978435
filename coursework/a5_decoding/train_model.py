"""Train the small character-level GPT that assignment 5 decodes from, and save it.

    python coursework/a5_decoding/train_model.py        # writes attention_lib/data/a5_char_gpt.pt

The weights ship inside the package (``attention_lib/data/``), not in this folder: the
grader's sandbox hides ``coursework/`` from the student's kernel, and Colab installs
the package, not the repository. The file is a plain dict, loadable with
``torch.load(path, weights_only=True)``::

    {"config": {...GPTConfig fields...}, "chars": "<the vocabulary, in id order>",
     "state_dict": {name: float32 tensor}, "trained": {...how it was trained...}}

The model: attention_lib.gpt.GPT (chapter 16) with 2 layers, 4 query heads and 2
key/value heads (grouped-query attention), width 64, 128 positions, 109 568
parameters (440 KB in float32). It is trained for ``STEPS`` steps of AdamW on random
windows of Jane Austen's *Persuasion* (``attention_lib.gpt.load_text``), with seed 0 on
one thread: about 3.5 minutes on one core, to a training loss of about 1.55 nats per
character. Training again gives a similar model, not necessarily the same
bits (kernels differ across machines and PyTorch versions); the hidden tests compute
their reference tokens from the shipped file, so they do not depend on that.
"""

from __future__ import annotations

import pathlib
import time

import torch

from attention_lib.gpt import GPT, CharTokenizer, GPTConfig, load_text

OUT = pathlib.Path(__file__).resolve().parents[2] / "attention_lib" / "data" / "a5_char_gpt.pt"
CONFIG = dict(block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, dropout=0.0)
STEPS, BATCH, CONTEXT, LR = 1500, 32, 128, 3e-3


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    text = load_text("persuasion")
    tok = CharTokenizer(text)
    data = tok.encode(text)  # (N,) int64
    config = dict(vocab_size=tok.vocab_size, **CONFIG)
    model = GPT(GPTConfig(**config))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(STEPS):
        lr = LR * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / STEPS))  # warm-up, linear decay
        for group in opt.param_groups:
            group["lr"] = lr
        ix = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,), generator=g)
        x = torch.stack([data[i : i + CONTEXT] for i in ix])  # (B, T)
        y = torch.stack([data[i + 1 : i + CONTEXT + 1] for i in ix])  # (B, T)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)")
    model.eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    trained = dict(steps=STEPS, batch=BATCH, context=CONTEXT, lr=LR, optimizer="AdamW(weight_decay=0.01)",
                   seed=0, final_loss=round(loss.item(), 3), text="persuasion")
    torch.save({"config": config, "chars": "".join(tok.chars), "state_dict": state, "trained": trained}, OUT)
    n = sum(v.numel() for v in state.values())
    print(f"saved {OUT} ({OUT.stat().st_size / 1024:.0f} KB, {n} parameters)")


if __name__ == "__main__":
    main()
