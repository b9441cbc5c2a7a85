"""Bring your own data: ``jsonl:PATH`` and ``dataset:PATH`` as tasks, in the library and end to end
through ``specdef attack``; malformed records are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specdef import zoo
from specdef.cli import main
from specdef.errors import SpecdefError
from specdef.tasks import CausalLMTask, ClassificationTask
from specdef.zoo import images


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _digits_records(n: int = 300) -> list[dict[str, object]]:
    x, y = images.load_digits_tensors()
    keep = (y >= 5).nonzero().flatten()[:n]
    return [{"features": x[i].tolist(), "label": int(y[i])} for i in keep]


QA = [
    {"prompt": f"Question {i}: how do I do thing {i}?", "response": f"Do step {i}."}
    for i in range(20)
]


@pytest.fixture(scope="module")
def tokenizer():
    return zoo.load_tokenizer("tiny-llama")


def test_jsonl_labelled_task_matches_the_records(tmp_path: Path) -> None:
    records = _digits_records(50)
    task = zoo.load_task("jsonl:" + str(_write_jsonl(tmp_path / "d.jsonl", records)))
    assert isinstance(task, ClassificationTask)
    x_train, y_train = task.train
    x_held, y_held = task.heldout["harmful"]
    assert len(y_train) + len(y_held) == 50 and len(y_held) == 5
    # every example is one of the records, unchanged, and none is both trained on and held out
    seen = {(tuple(r["features"][0][0]), r["label"]) for r in records}  # type: ignore[index]
    assert {
        (tuple(x[0, 0].tolist()), int(y)) for x, y in zip(x_train, y_train, strict=True)
    } <= seen
    train_rows = {x.numpy().tobytes() for x in x_train}
    assert not any(x.numpy().tobytes() in train_rows for x in x_held)
    again = zoo.load_task("jsonl:" + str(tmp_path / "d.jsonl"))
    assert torch.equal(again.train[0], x_train)  # the split is fixed by the seed


def test_jsonl_qa_masks_the_prompt(tmp_path: Path, tokenizer) -> None:
    path = _write_jsonl(tmp_path / "qa.jsonl", QA)
    task = zoo.load_task(f"jsonl:{path}", tokenizer=tokenizer, max_length=64)
    assert isinstance(task, CausalLMTask)
    assert len(task.train) == 18 and len(task.heldout["harmful"]) == 2
    example = task.train[0]
    answer = [
        t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != -100
    ]
    assert "Do step" in tokenizer.decode(answer) and "Question" not in tokenizer.decode(answer)


def test_dataset_directory_keeps_its_own_split(tmp_path: Path, tokenizer) -> None:
    import datasets

    texts = [
        {"text": f"The river {i} flows north past the old mill and the bridge."} for i in range(12)
    ]
    split = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(texts[:9]),
            "test": datasets.Dataset.from_list(texts[9:]),
        }
    )
    split.save_to_disk(str(tmp_path / "ds"))
    task = zoo.load_task(f"dataset:{tmp_path / 'ds'}", tokenizer=tokenizer, max_length=32)
    assert len(task.train) == 9 and len(task.heldout["harmful"]) == 3
    assert task.train[0]["labels"] == task.train[0]["input_ids"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a", "response": "b"}\nnot json\n', r"qa.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "response": "b"}\n[1, 2]\n', r"qa.jsonl:2: expected a JSON object"),
        ('{"prompt": "a"}\n{"prompt": "b"}\n', r"expected an object with prompt\+response"),
        ('{"prompt": "a", "response": "b"}\n{"text": "c"}\n', r"a text record among qa records"),
        (
            '{"prompt": "a", "response": 3}\n{"prompt": "b", "response": "c"}\n',
            r"'response' must be a string",
        ),
        (
            '{"features": [1, 2], "label": 1}\n{"features": [1], "label": 0}\n',
            r"'features' has shape \(\d,\), expected \(\d,\)",
        ),
        (
            '{"features": [1, 2], "label": -1}\n{"features": [1, 2], "label": 0}\n',
            r"'label' must be an integer",
        ),
        ('{"prompt": "a", "response": "b"}\n', r"at least 2 records"),
    ],
)
def test_malformed_records_are_one_line_errors(
    tmp_path: Path, tokenizer, content: str, message: str
) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(content)
    with pytest.raises(SpecdefError, match=message):
        zoo.load_task(f"jsonl:{path}", tokenizer=tokenizer)


def test_missing_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecdefError, match="no such file"):
        zoo.load_task(f"jsonl:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(SpecdefError, match="no such directory"):
        zoo.load_task(f"dataset:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecdefError, match="not a saved Hugging Face dataset"):
        zoo.load_task(f"dataset:{tmp_path / 'empty'}")
    _write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}, {"text": "d e f"}])
    with pytest.raises(SpecdefError, match="no tokenizer"):
        zoo.load_task(f"jsonl:{tmp_path / 't.jsonl'}")


def test_attack_cli_on_user_jsonl_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images_path = _write_jsonl(tmp_path / "digits.jsonl", _digits_records())
    args = ["--optimizer", "adam", "--lr", "1e-2", "--steps", "40", "--batch-size", "64"]
    args += ["--threshold", "harmful_accuracy>=0.6", "--eval-every", "5", "--json"]
    assert main(["attack", "mlp-digits", "--data", f"jsonl:{images_path}", *args]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["summary"]["steps_to_threshold"] is not None  # the undefended MLP learns it

    qa_path = _write_jsonl(tmp_path / "qa.jsonl", QA)
    args = ["--optimizer", "adamw", "--lr", "1e-3", "--steps", "4", "--batch-size", "4"]
    args += [
        "--threshold",
        "harmful_loss<=0.5",
        "--eval-every",
        "2",
        "--max-length",
        "48",
        "--json",
    ]
    assert main(["attack", "tiny-llama", "--data", f"jsonl:{qa_path}", *args]) == 0
    rows = json.loads(capsys.readouterr().out)
    losses = [e["harmful_loss"] for e in rows[0]["evals"]]
    assert len(losses) >= 2 and all(v == v for v in losses)
