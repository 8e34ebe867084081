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
