import pytest
from datasets import Dataset

from dft.data import DataError, detect_format, prepare_dataset
from tests.helpers.tiny_models import tiny_tokenizer

# user turns: "t4 <content>"; assistant turns: header "t5", then "<content> <eos>"
CHAT = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}t5 {{ m['content'] }} <eos> "
    "{% else %}t4 {{ m['content'] }} {% endif %}{% endfor %}{% if add_generation_prompt %}t5 {% endif %}"
)


def _tok():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT
    return tok


def test_chat_masks_user_turns_and_assistant_header():
    tok = _tok()
    messages = [
        {"role": "user", "content": "t10 t11"},
        {"role": "assistant", "content": "t20 t21"},
        {"role": "user", "content": "t12"},
        {"role": "assistant", "content": "t22"},
    ]
    ds, report = prepare_dataset(Dataset.from_list([{"messages": messages}]), tok, max_length=64)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    eos = tok.eos_token_id
    assert ids == [4, 10, 11, 5, 20, 21, eos, 4, 12, 5, 22, eos]
    assert labels == [-100, -100, -100, -100, 20, 21, eos, -100, -100, -100, 22, eos]
    assert report.supervised_tokens == 5  # next-token targets: labels[1:]


def test_prompt_completion_supervises_completion_and_eos():
    tok = _tok()
    ds, _ = prepare_dataset(Dataset.from_list([{"prompt": "t7 t8", "completion": "t9"}]), tok, max_length=16)
    assert ds[0]["labels"] == [-100, -100, 9, tok.eos_token_id]


def test_truncation_drops_examples_without_targets():
    tok = _tok()
    rows = [{"prompt": "t7 t8 t9 t10", "completion": "t11"}, {"prompt": "t7", "completion": "t11 t12"}]
    ds, report = prepare_dataset(Dataset.from_list(rows), tok, max_length=3)
    assert (report.kept, report.dropped, len(ds)) == (1, 1, 1)


def test_formats_and_errors():
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["messages"]) == "messages"
    assert detect_format(["text"]) == "text"
    with pytest.raises(DataError, match="expected 'prompt'"):
        detect_format(["question"])
    with pytest.raises(DataError, match="no chat template"):
        prepare_dataset(Dataset.from_list([{"messages": [{"role": "user", "content": "t4"}]}]), tiny_tokenizer(), 8)


def _ids(rendered):
    """apply_chat_template(tokenize=True): a list, or in transformers 5 a BatchEncoding."""
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def _reference_chat(messages, tok):
    """The whole conversation rendered once; each assistant turn's tokens supervised: from the end of the
    conversation before it with the generation prompt (the assistant header) to the end of the turn."""
    ids = _ids(tok.apply_chat_template(messages, tokenize=True))
    labels = [-100] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(_ids(tok.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True)))
            end = len(_ids(tok.apply_chat_template(messages[: i + 1], tokenize=True)))
            labels[start:end] = ids[start:end]
    return ids, labels


def _reference_prepare(rows, tok, max_length):
    """Row by row, plain Python (no dft code): the masks datasets.map must give."""
    out = []
    for ex in rows:
        if "prompt" in ex:
            prompt = tok(ex["prompt"])["input_ids"]
            completion = tok(ex["completion"], add_special_tokens=False)["input_ids"]
            if not completion or completion[-1] != tok.eos_token_id:
                completion = completion + [tok.eos_token_id]
            ids, labels = prompt + completion, [-100] * len(prompt) + completion
        elif "text" in ex:
            ids = tok(ex["text"])["input_ids"] + [tok.eos_token_id]
            labels = list(ids)
        else:
            ids, labels = _reference_chat(ex["messages"], tok)
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != -100 for label in labels[1:]):
            out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("fmt", ["prompt_completion", "text", "messages"])
@pytest.mark.parametrize("num_proc", [1, 2])
def test_map_preparation_equals_row_by_row(fmt, num_proc):
    """datasets.map (batched, in worker processes) gives the masks of the row-by-row preparation, and the
    report's counts match the rows."""
    import random

    rng = random.Random(0)
    tok = _tok()

    def words(k):
        return " ".join(f"t{rng.randrange(6, 60)}" for _ in range(k))

    rows = []
    for _ in range(300):
        if fmt == "prompt_completion":
            rows.append({"prompt": words(rng.randrange(1, 12)), "completion": words(rng.randrange(0, 6))})
        elif fmt == "text":
            rows.append({"text": words(rng.randrange(1, 20))})
        else:
            turns = [{"role": "system", "content": words(rng.randrange(1, 8))}] if rng.random() < 0.3 else []
            for _ in range(rng.randrange(1, 3)):
                turns += [{"role": "user", "content": words(3)}, {"role": "assistant", "content": words(2)}]
            rows.append({"messages": turns})
    ds, report = prepare_dataset(Dataset.from_list(rows), tok, max_length=10, num_proc=num_proc)
    expected = _reference_prepare(rows, tok, 10)
    assert ds.column_names == ["input_ids", "labels"]
    assert [dict(r) for r in ds] == expected
    assert report.kept == len(expected) and report.dropped == len(rows) - len(expected)
    assert report.dropped > 0 or fmt == "text"  # long prompts lose every target at max_length=10
    assert report.tokens == sum(len(r["input_ids"]) for r in expected)
    assert report.supervised_tokens == sum(sum(x != -100 for x in r["labels"][1:]) for r in expected)
    assert 0 < report.truncated < report.kept


def test_chat_roles_and_missing_assistant_turns_are_diagnosed():
    tok = _tok()
    bot = [{"messages": [{"role": "user", "content": "t7"}, {"role": "bot", "content": "t8"}]}]
    with pytest.raises(DataError, match="row 1: messages\\[1\\] has role 'bot'; expected one of system"):
        prepare_dataset(Dataset.from_list(bot), tok, 16)
    no_assistant = [{"messages": [{"role": "user", "content": "t7"}]}] * 3
    with pytest.raises(DataError, match="3 of 3 conversations have no 'assistant' message"):
        prepare_dataset(Dataset.from_list(no_assistant), tok, 16)


def test_text_files_utf8_bom_and_decode_errors(tmp_path):
    from dft.data import load_local_dataset

    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "t7", "completion": "t8"}\n{"prompt": "t9", "completion": "t10"}\n')
    assert load_local_dataset(bom)["prompt"] == ["t7", "t9"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "t7", "completion": "t8"}\n{"prompt": "caf\xe9", "completion": "t8"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8 \(byte 0xe9 at column 16\)"):
        load_local_dataset(latin)
    csv_bom = tmp_path / "bom.csv"
    csv_bom.write_bytes(b"\xef\xbb\xbfprompt,completion\nt7,t8\n")
    assert load_local_dataset(csv_bom).column_names == ["prompt", "completion"]
    csv_latin = tmp_path / "latin.csv"
    csv_latin.write_bytes(b"prompt,completion\ncaf\xe9,t8\n")
    with pytest.raises(DataError, match=r"latin.csv:2: not UTF-8"):
        load_local_dataset(csv_latin)
    csv_cols = tmp_path / "cols.csv"
    csv_cols.write_text("question,answer\na,b\n")
    with pytest.raises(DataError, match=r"cols.csv: the dataset has columns \['question', 'answer'\]"):
        load_local_dataset(csv_cols)


def test_jsonl_is_cached_as_arrow_and_reread_after_a_change(tmp_path):
    from dft.data import load_local_dataset

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "t7 t8"}\n')
    first = load_local_dataset(path)
    assert first.cache_files and load_local_dataset(path).cache_files == first.cache_files  # reused
    path.write_text('{"text": "t7 t8"}\n{"text": "t9"}\n')
    assert load_local_dataset(path)["text"] == ["t7 t8", "t9"]  # a changed file is read again


def test_mixed_formats_are_named_as_such(tmp_path):
    """A messages row in prompt/completion data (or the reverse) says the rows mix formats, not that a
    field is null; in JSONL (format from the first row) and in Arrow data (absent columns are null)."""
    import json

    from dft.data import load_local_dataset

    pc = {"prompt": "t7", "completion": "t8"}
    chat = {"messages": [{"role": "user", "content": "t7"}, {"role": "assistant", "content": "t8"}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [pc, pc, pc, chat]))
    with pytest.raises(DataError, match=r"mixed.jsonl:4: a 'messages' \(chat\) row in prompt/completion data .*mix"):
        load_local_dataset(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "t7"}, pc]))
    with pytest.raises(DataError, match=r"mixed.jsonl:2: a prompt/completion row in 'text' data"):
        load_local_dataset(path)
    arrow = Dataset.from_list([{**pc, "messages": None}, {"prompt": None, "completion": None, **chat}])
    with pytest.raises(DataError, match=r"row 2: a 'messages' \(chat\) row in prompt/completion data"):
        prepare_dataset(arrow, _tok(), 16)
    ok = Dataset.from_list([{**pc, "text": "t9"}])  # an extra column is not another format
    assert prepare_dataset(ok, _tok(), 16)[1].kept == 1


def test_summary_counts_rows_that_truncation_emptied():
    """Rows whose every target lies past max_length are dropped; the summary says truncation did it (they
    are not counted among the kept rows' "truncated")."""
    tok = _tok()
    rows = [{"prompt": "t7 t8 t9 t10 t11", "completion": "t12"}] * 3 + [{"prompt": "t7", "completion": "t12"}]
    _, report = prepare_dataset(Dataset.from_list(rows), tok, max_length=4)
    assert (report.kept, report.truncated, report.dropped, report.dropped_by_truncation) == (1, 0, 3, 3)
    text = report.summary("train")
    assert "kept 1 (0 truncated), dropped 3 with no supervised token left (3 of them lost every target to " \
        "truncation at max_length 4: raise --max_length" in text  # fmt: skip
    chats = [{"messages": [{"role": "user", "content": "t7"}]}, {"messages": [{"role": "user", "content": "t8"},
             {"role": "assistant", "content": "t9"}]}]  # fmt: skip
    _, report = prepare_dataset(Dataset.from_list(chats), tok, max_length=16)
    assert (report.dropped, report.dropped_by_truncation) == (1, 0)  # no assistant turn: not truncation's doing
    assert "lost every target" not in report.summary("train")


# Weights in the data, samples.jsonl's token ids and row columns, the collator's float columns.

CHAT_ROWS = [
    {"role": "user", "content": "t10 t11"},
    {"role": "assistant", "content": "t20 t21"},
    {"role": "user", "content": "t12"},
    {"role": "assistant", "content": "t22"},
]
CHAT_IDS = [4, 10, 11, 5, 20, 21, 1, 4, 12, 5, 22, 1]  # eos is 1
CHAT_LABELS = [-100, -100, -100, -100, 20, 21, 1, -100, -100, -100, 22, 1]


def _weighted_turns(first, second):
    turns = [dict(m) for m in CHAT_ROWS]
    turns[1]["weight"], turns[3]["weight"] = first, second
    return turns


def test_chat_turn_weights_mask_zero_turns_and_weight_the_rest():
    tok = _tok()
    rows = [
        {"messages": _weighted_turns(0, 2.5)},
        {"messages": CHAT_ROWS},  # no weight: 1 on every assistant token
        {"messages": _weighted_turns(0, 0)},  # no target left: dropped, counted
    ]
    ds, report = prepare_dataset(Dataset.from_list(rows), tok, max_length=64)
    assert ds.column_names == ["input_ids", "labels", "loss_weights"]
    assert ds[0]["input_ids"] == ds[1]["input_ids"] == CHAT_IDS
    assert ds[0]["labels"] == [-100] * 10 + [22, 1]
    assert ds[0]["loss_weights"] == [0.0] * 10 + [2.5, 2.5]
    assert ds[1]["labels"] == CHAT_LABELS  # as the same row in data without weights
    assert ds[1]["loss_weights"] == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert (report.kept, report.dropped, report.dropped_by_weight, report.supervised_tokens) == (2, 1, 1, 7)
    assert "dropped 1 with no supervised token left (1 of them with weight 0 on every target)" in report.summary("t")
    unweighted, _ = prepare_dataset(Dataset.from_list([{"messages": CHAT_ROWS}]), tok, max_length=64)
    assert unweighted.column_names == ["input_ids", "labels"] and unweighted[0]["labels"] == CHAT_LABELS


def test_weights_of_one_leave_no_weight_column():
    """A weight field whose kept supervised tokens all weigh 1 (weights 0 and 1 only): the labels say it all."""
    tok = _tok()
    ds, _ = prepare_dataset(Dataset.from_list([{"messages": _weighted_turns(0, 1)}]), tok, max_length=64)
    assert ds.column_names == ["input_ids", "labels"] and ds[0]["labels"] == [-100] * 10 + [22, 1]
    rows = [{"text": "t7", "weight": 1.0}, {"text": "t8 t9", "weight": None}]
    ds, _ = prepare_dataset(Dataset.from_list(rows), tok, max_length=64)
    assert ds.column_names == ["input_ids", "labels"]


def test_row_weights_for_prompt_completion_and_text():
    tok = _tok()
    rows = [
        {"prompt": "t7 t8", "completion": "t9", "weight": 2.5},
        {"prompt": "t7", "completion": "t9", "weight": None},
        {"prompt": "t7", "completion": "t9 t10", "weight": 0.0},
    ]
    ds, report = prepare_dataset(Dataset.from_list(rows), tok, max_length=16)
    assert [r["labels"] for r in ds] == [[-100, -100, 9, 1], [-100, 9, 1]]
    assert [r["loss_weights"] for r in ds] == [[0.0, 0.0, 2.5, 2.5], [0.0, 1.0, 1.0]]
    assert (report.kept, report.dropped_by_weight, report.dropped_by_truncation) == (2, 1, 0)
    texts = [{"text": "t7 t8", "weight": 0.5}, {"text": "t9", "weight": 3}]
    ds, _ = prepare_dataset(Dataset.from_list(texts), tok, max_length=16)
    assert [r["labels"] for r in ds] == [[7, 8, 1], [9, 1]]
    assert [r["loss_weights"] for r in ds] == [[0.5, 0.5, 0.5], [3.0, 3.0]]
    ds, _ = prepare_dataset(Dataset.from_list(texts), tok, max_length=2)  # truncated alike
    assert [r["loss_weights"] for r in ds] == [[0.5, 0.5], [3.0, 3.0]]
    with pytest.raises(DataError, match=r"every example \(1\) has weight 0 on every target"):
        prepare_dataset(Dataset.from_list([{"text": "t7 t8", "weight": 0}]), tok, 16)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"text": "t7", "weight": 1.0}, {"text": "t8", "weight": -1.0}], r"row 2: 'weight' must be a number >= 0"),
        ([{"prompt": "t7", "completion": "t8", "weight": "abc"}], r"row 1: 'weight' must be .*got 'abc'"),
        ([{"text": "t7", "weight": True}], r"row 1: 'weight' must be .*got True"),
        ([{"text": "t7", "weight": 1.0}, {"text": "t8", "weight": float("nan")}], r"row 2: 'weight' .*got nan"),
        (
            [{"messages": CHAT_ROWS}, {"messages": [{"role": "user", "content": "t7", "weight": 1.0}, CHAT_ROWS[1]]}],
            r"row 2: messages\[0\] \(user\) has a 'weight': only assistant turns",
        ),
        ([{"messages": _weighted_turns(1.0, -0.5)}], r"row 1: messages\[3\] 'weight' must be a number >= 0"),
        ([{"messages": CHAT_ROWS, "weight": 2.0}], r"row 1: a 'weight' on a messages row: put it on the assistant"),
    ],
    ids=["negative", "string", "bool", "nan", "user_turn", "negative_turn", "messages_row"],
)
def test_bad_weights_name_the_row(rows, match):
    with pytest.raises(DataError, match=match):
        prepare_dataset(Dataset.from_list(rows), _tok(), 16)


def test_jsonl_weights_are_typed_whichever_rows_carry_them(tmp_path):
    """Weights that appear after the first 1000 rows, ints then floats, on some turns only: one float type
    (Arrow would otherwise clash, or leave the field out); a bad one names the line."""
    import json

    from dft.data import load_local_dataset

    pc = tmp_path / "pc.jsonl"
    rows = [{"prompt": "t7", "completion": "t8"}] * 1200 + [{"prompt": "t7", "completion": "t8", "weight": 2}]
    pc.write_text("".join(json.dumps(r) + "\n" for r in rows + [{**rows[-1], "weight": 0.5}]))
    ds = load_local_dataset(pc)
    assert ds["weight"][0] == 1.0 and ds["weight"][-2:] == [2.0, 0.5]
    turn = {"role": "assistant", "content": "t8"}
    chat = [{"messages": [{"role": "user", "content": "t7"}, turn]}] * 1200
    chat += [{"messages": [{"role": "user", "content": "t7"}, {**turn, "weight": 0}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat))
    assert load_local_dataset(path)[-1]["messages"][1] == {"role": "assistant", "content": "t8", "weight": 0.0}
    assert "weight" not in load_local_dataset(path, prompts_only=True)[-1]["messages"][1]  # not for sampling
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in [chat[0], {"messages": _weighted_turns(0, 2.5)}]))
    ds, _ = prepare_dataset(load_local_dataset(small), _tok(), 64)
    assert ds[1]["loss_weights"] == [0.0] * 10 + [2.5, 2.5] and ds[0]["loss_weights"] == [0, 0, 0, 1.0, 1.0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "t7"}\n{"text": "t8", "weight": "abc"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: 'weight' must be a number >= 0"):
        load_local_dataset(bad)


def _sample_row(prompt_ids, completion_ids, accepted, prompt_index, **extra):
    return {"prompt": "t7", "completion": "t9", "prompt_ids": prompt_ids, "completion_ids": completion_ids,
            "accepted": accepted, "prompt_index": prompt_index, **extra}  # fmt: skip


def test_sampled_token_ids_are_used_as_they_are_and_row_columns_kept():
    tok = _tok()
    rows = [
        _sample_row([3, 7], [9, 10, 1], True, 0),  # finished: ends with the stop id
        _sample_row([3, 7], [9, 10], False, 0),  # cut by max_new_tokens: no EOS added
        _sample_row(None, None, True, 1),  # text only: tokenised, EOS appended
    ]
    ds, report = prepare_dataset(Dataset.from_list(rows), tok, max_length=16)
    assert ds.column_names == ["input_ids", "labels", "accepted", "prompt_index"]
    assert ds["input_ids"] == [[3, 7, 9, 10, 1], [3, 7, 9, 10], [7, 9, 1]]
    assert ds["labels"] == [[-100, -100, 9, 10, 1], [-100, -100, 9, 10], [-100, 9, 1]]
    assert ds["accepted"] == [1, 0, 1] and ds["prompt_index"] == [0, 0, 1]
    assert (report.sampled_ids, report.examples_in) == (2, 3)
    ds, report = prepare_dataset(Dataset.from_list(rows[:2]), tok, max_length=3)  # truncated like other rows
    assert ds["input_ids"] == [[3, 7, 9], [3, 7, 9]] and report.truncated == 2
    chat = [{"role": "user", "content": "t7"}]  # a chat prompt: its ids stand for it
    ds, _ = prepare_dataset(Dataset.from_list([_sample_row([4, 7, 5], [9, 1], 1, 0, prompt=chat)]), tok, 16)
    assert ds[0]["input_ids"] == [4, 7, 5, 9, 1] and ds[0]["labels"] == [-100, -100, -100, 9, 1]
    weighted, _ = prepare_dataset(Dataset.from_list([_sample_row([3], [9, 1], 1, 0, weight=0.5)]), tok, 16)
    assert weighted[0]["loss_weights"] == [0.0, 0.5, 0.5]


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (_sample_row([3], [9], 2, 0), r"row 1: 'accepted' must be true/false or 0/1, got 2"),
        (_sample_row([3], [9], True, -1), r"row 1: 'prompt_index' must be an integer >= 0, got -1"),
        (_sample_row([3], [-9], True, 0), r"row 1: 'completion_ids' must be a list of token ids"),
    ],
)
def test_bad_sample_rows_name_the_row(row, match):
    with pytest.raises(DataError, match=match):
        prepare_dataset(Dataset.from_list([row]), _tok(), 16)


FEATURES = [
    {"input_ids": [7, 8, 9], "labels": [-100, 8, 9], "loss_weights": [0.0, 2.5, 0.5], "accepted": 1,
     "prompt_index": 0, "nft_rhat": 0.25},
    {"input_ids": [4, 5], "labels": [-100, 5], "loss_weights": [0.0, 1.0], "accepted": 0, "prompt_index": 1,
     "nft_rhat": 0.5},
]  # fmt: skip


def _plain(features):
    return [{k: f[k] for k in ("input_ids", "labels")} for f in features]


def test_collator_pads_float_columns_aligned_with_labels():
    import torch
    from transformers import DataCollatorForSeq2Seq

    from dft.data import ROW_COLUMNS, TOKEN_COLUMNS, collator

    assert TOKEN_COLUMNS == ("loss_weights",) and ROW_COLUMNS == ("accepted", "nft_rhat")
    tok = _tok()
    batch = collator(tok)(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "loss_weights", "accepted", "nft_rhat"}
    assert batch["labels"].tolist() == [[-100, 8, 9], [-100, 5, -100]]
    for key in ("loss_weights", "accepted", "nft_rhat"):
        assert batch[key].dtype == torch.float32 and batch[key].shape == batch["labels"].shape
    assert batch["loss_weights"].tolist() == [[0.0, 2.5, 0.5], [0.0, 1.0, 0.0]]
    assert batch["accepted"].tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    assert batch["nft_rhat"].tolist() == [[0.25, 0.25, 0.25], [0.5, 0.5, 0.0]]
    plain = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)(_plain(FEATURES))
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], plain[key])
    without = collator(tok)(_plain(FEATURES))  # no float columns: transformers' batch as it is
    assert set(without) == set(plain) and all(torch.equal(without[k], plain[k]) for k in plain)
    assert collator(tok).tokenizer is tok  # Trainer saves it when given no processing_class
    tok.padding_side = "left"  # aligned with the labels whichever side pads
    left = collator(tok)(FEATURES)
    assert left["labels"].tolist() == [[-100, 8, 9], [-100, -100, 5]]
    assert left["loss_weights"].tolist() == [[0.0, 2.5, 0.5], [0.0, 0.0, 1.0]]
    assert left["nft_rhat"].tolist() == [[0.25, 0.25, 0.25], [0.0, 0.5, 0.5]]


def test_collator_packs_float_columns_like_labels():
    import torch
    from transformers import DataCollatorWithFlattening

    from dft.data import collator

    batch = collator(_tok(), packing=True)(FEATURES)
    assert set(batch) == {"input_ids", "labels", "position_ids", "loss_weights", "accepted", "nft_rhat"}
    assert batch["labels"].tolist() == [[-100, 8, 9, -100, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["loss_weights"].tolist() == [[0.0, 2.5, 0.5, 0.0, 1.0]]
    assert batch["accepted"].tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]
    assert batch["nft_rhat"].tolist() == [[0.25, 0.25, 0.25, 0.5, 0.5]]
    assert batch["nft_rhat"].dtype == torch.float32
    plain = DataCollatorWithFlattening(return_position_ids=True)(_plain(FEATURES))
    without = collator(_tok(), packing=True)(_plain(FEATURES))
    assert set(without) == set(plain) and all(torch.equal(without[k], plain[k]) for k in plain)


def test_collator_on_prepared_rows():
    """The prepared dataset's rows go through the collator as they are (accepted from samples.jsonl, nft_rhat
    added to the dataset)."""
    from dft.data import collator

    rows = [_sample_row([3, 7], [9, 10, 1], True, 0, weight=2.0), _sample_row([3], [9], False, 0, weight=1.0)]
    ds, _ = prepare_dataset(Dataset.from_list(rows), _tok(), 16)
    ds = ds.add_column("nft_rhat", [0.5, 0.5])
    batch = collator(_tok())([ds[i] for i in range(len(ds))])
    assert "prompt_index" not in batch
    assert batch["labels"].tolist() == [[-100, -100, 9, 10, 1], [-100, 9, -100, -100, -100]]
    assert batch["loss_weights"].tolist() == [[0, 0, 2, 2, 2], [0, 1, 0, 0, 0]]
    assert batch["accepted"].tolist() == [[1] * 5, [0, 0, 0, 0, 0]]
    assert batch["nft_rhat"].tolist() == [[0.5] * 5, [0.5, 0.5, 0, 0, 0]]
