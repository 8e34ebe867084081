"""The study's synthetic world: a character vocabulary, the pretraining skills and the fine-tuning tasks.

Every example is ``{"prompt": str, "completion": str}``; the loss supervises the completion only.

Skills (pretraining corpus, see ``pretrain_corpus``)::

    add2     Q: 23+58=?\\n          -> 23+58=81. A: 81\\n            (2 terms, 2 digits, worked)
    add3s    Q: 2+5+7=?\\n          -> 2+5=7; 7+7=14. A: 14\\n       (3 terms, 1 digit, worked)
    sub      Q: 52-17=?\\n          -> 52-17=35. A: 35\\n
    quick    Q: 23+58=? quick\\n    -> A: 81\\n                      (direct answer, no steps)
    spell    Q: spell 58\\n         -> A: five eight\\n
    code     Q: code kbx\\n         -> A: 417\\n                     (a lookup table, memorised)
    target   Q: 23+58+7=?\\n        -> 23+58=81; 81+7=88. A: 88\\n   (3 terms, 2 digits: a small share)

Fine-tuning tasks: ``reasoning`` (the target, few hundred demonstrations), ``noisy`` (the same with a
share of corrupted demonstrations), ``knowledge`` (a new code table: facts with no prior).
"""

from __future__ import annotations

import random
import re

PAD, BOS = 0, 1
CHARS = "0123456789+-=?;.:QA \nabcdefghijklmnopqrstuvwxyz"  # dft.toy's characters first, same ids
_INDEX = {c: i + 2 for i, c in enumerate(CHARS)}
VOCAB_SIZE = len(CHARS) + 2
EOS = _INDEX["\n"]
WORDS = "zero one two three four five six seven eight nine".split()


def encode(text: str) -> list[int]:
    return [_INDEX[c] for c in text]


def decode(ids: list[int]) -> str:
    return "".join(CHARS[i - 2] for i in ids if i >= 2)


def answer(text: str) -> str:
    """The final answer of a completion (or a generation): the text after the last 'A: ' on the first line."""
    return text.split("\n")[0].split("A: ")[-1].strip()


def tokenizer():
    """A ``PreTrainedTokenizerFast`` with the ids of :func:`encode` (``<bos>`` prepended, newline = eos)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<pad>": PAD, "<bos>": BOS, **_INDEX}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="\n", padding_side="right"
    )


# ---- skills ----------------------------------------------------------------------------------------


def sums(n: int, rng: random.Random, *, terms: int, digits: int, phrasing: str = "plain") -> list[dict]:
    """Worked sums. ``phrasing="compact"`` writes the prompt as 'Q:23+58+7=?' (no space: never seen in pretraining)."""
    out = []
    for _ in range(n):
        nums = [rng.randint(0, 10**digits - 1) for _ in range(terms)]
        steps, acc = [], nums[0]
        for x in nums[1:]:
            steps.append(f"{acc}+{x}={acc + x}")
            acc += x
        space = "" if phrasing == "compact" else " "
        out.append(
            {"prompt": f"Q:{space}{'+'.join(map(str, nums))}=?\n", "completion": f"{'; '.join(steps)}. A: {acc}\n"}
        )
    return out


def subtractions(n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
        out.append({"prompt": f"Q: {a}-{b}=?\n", "completion": f"{a}-{b}={a - b}. A: {a - b}\n"})
    return out


def quick(n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append({"prompt": f"Q: {a}+{b}=? quick\n", "completion": f"A: {a + b}\n"})
    return out


def spell(n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        x = rng.randint(0, 999)
        out.append({"prompt": f"Q: spell {x}\n", "completion": f"A: {' '.join(WORDS[int(d)] for d in str(x))}\n"})
    return out


def code_table(n: int, seed: int) -> list[dict]:
    """``n`` facts 'code <3 letters> -> <3 digits>', random keys and values (no structure to learn)."""
    rng = random.Random(seed)
    keys = set()
    while len(keys) < n:
        keys.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3)))
    return [{"prompt": f"Q: code {k}\n", "completion": f"A: {rng.randint(100, 999)}\n"} for k in sorted(keys)]


PRETRAIN_TABLE_SEED = 7  # the base memorises this table; the knowledge task uses fresh keys (see knowledge_facts)


def pretrain_corpus(n: int, rng: random.Random, target_share: float) -> list[dict]:
    """A mixed batch of every pretraining skill; ``target_share`` of it is the target task itself."""
    table = code_table(300, PRETRAIN_TABLE_SEED)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < target_share:
            out += sums(1, rng, terms=3, digits=2)
        else:
            skill = rng.choice(["add2", "add2", "add3s", "sub", "quick", "spell", "code"])
            if skill == "add2":
                out += sums(1, rng, terms=2, digits=2)
            elif skill == "add3s":
                out += sums(1, rng, terms=3, digits=1)
            elif skill == "sub":
                out += subtractions(1, rng)
            elif skill == "quick":
                out += quick(1, rng)
            elif skill == "spell":
                out += spell(1, rng)
            else:
                out.append(rng.choice(table))
    return out


# ---- fine-tuning tasks and evaluation sets -----------------------------------------------------------


def corrupt(example: dict, rng: random.Random) -> dict:
    """One wrong digit in a step result or in the final answer (the rest of the text unchanged)."""
    text = example["completion"]
    spots = [i for m in re.finditer(r"(?:=|A: )(\d+)", text) for i in range(m.start(1), m.end(1))]
    i = rng.choice(spots)
    wrong = rng.choice([d for d in "0123456789" if d != text[i]])
    return {"prompt": example["prompt"], "completion": text[:i] + wrong + text[i + 1 :]}


def knowledge_facts(n: int, seed: int) -> list[dict]:
    """Fresh facts: keys that are not in the pretraining table (so the base has no prior on them)."""
    known = {e["prompt"] for e in code_table(300, PRETRAIN_TABLE_SEED)}
    return [e for e in code_table(n + 300, 10_000 + seed) if e["prompt"] not in known][:n]


def eval_sets(n: int) -> dict[str, list[dict]]:
    """Fixed evaluation sets (the same for every seed and loss)."""
    rng = random.Random(2024)
    return {
        "val": sums(n, rng, terms=3, digits=2),  # picks the learning rate
        "id": sums(n, rng, terms=3, digits=2),
        "ood_terms": sums(n, rng, terms=4, digits=1),  # one step more than any pretraining or fine-tuning example
        "ood_phrasing": sums(n, rng, terms=3, digits=2, phrasing="compact"),
        # retention: pretraining skills the reasoning demonstrations do not cover
        "keep_sub": subtractions(n, rng),
        "keep_quick": quick(n, rng),
        "keep_spell": spell(n, rng),
        "keep_code": code_table(300, PRETRAIN_TABLE_SEED)[:n],
    }
