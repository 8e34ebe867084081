"""DFT in a plain PyTorch loop (nanoGPT style): a tiny Llama learns multi-step addition on CPU.

    python examples/train_loop.py

Everything is offline: the model is built from a config and the data is generated (dft.toy).
"""

import time

import torch

import dft
from dft.toy import arithmetic_examples, toy_batch, toy_model

# ---- settings ---------------------------------------------------------------------------------
steps = 300  # optimizer steps
micro_batch = 16  # sequences per forward pass
accum = 2  # micro-batches per optimizer step (gradient accumulation)
lr = 3e-3
alpha = 1.0  # DFT weight p ** alpha (0 = plain SFT / cross-entropy)
warmup = 100  # CE -> DFT warm-up: beta ramps 0 -> 1 (a model trained from scratch needs a CE start)
seed = 0
log_every = 25
# -----------------------------------------------------------------------------------------------

torch.manual_seed(seed)
model = toy_model(hidden_size=64, num_layers=2, seed=seed)
optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
train = arithmetic_examples(steps * micro_batch * accum, seed=seed)

t0 = time.time()
for step in range(steps):
    start = step * micro_batch * accum
    micro_batches = [toy_batch(train[start + i * micro_batch : start + (i + 1) * micro_batch]) for i in range(accum)]
    # Exact accumulation: each micro-batch's *sum* is divided by the supervised tokens of the whole
    # step (not by its own count, which would give a mean of means). No extra division by `accum`.
    num_items = dft.global_num_items(micro_batches)
    weighting = dft.DFTWeight(alpha=alpha, beta=dft.beta_schedule(step, 1.0, warmup))
    stats = None
    for mb in micro_batches:
        out = dft.causal_lm_loss(model, mb, weighting, num_items_in_batch=num_items)
        out.loss.backward()
        stats = dft.TokenStats.accumulate(stats, out.stats)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % log_every == 0 or step == steps - 1:
        s = stats.as_dict()
        # the DFT loss is ~p times the CE: log the CE to compare with an SFT run
        print(
            f"step {step:4d} | beta {weighting.beta:.2f} | ce {s['ce']:.3f} | mean p {s['mean_p']:.3f} | acc {s['token_accuracy']:.3f}"
            f" | {time.time() - t0:.1f}s"
        )

# ---- greedy answers on fresh problems ----------------------------------------------------------
model.eval()
test = arithmetic_examples(50, seed=seed + 1)
correct = 0
with torch.no_grad():
    for ex in test:
        ids = toy_batch([{"prompt": ex["prompt"], "completion": ""}])["input_ids"]
        gen = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
        text = dft.toy.decode(gen[0, ids.shape[1] :].tolist())
        correct += text.split("A: ")[-1].split("\n")[0] == ex["completion"].split("A: ")[-1].strip()
print(f"exact-match on 50 held-out problems: {correct / len(test):.2f}")
