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
