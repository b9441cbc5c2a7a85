"""The sections of the two study pages (``specdef.report.informed``, ``specdef.report.native``),
from hand-made rows whose answers are computed here: the undefended lr*, ratios, the control's
selection, the best learning rate per optimizer."""

from __future__ import annotations

from specdef.report.informed import digits_section, flatten, smollm2_section
from specdef.report.native import native_section, variant_name
from specdef.report.optimizers import ladder_section, lora_section, optimizer_grid_section


def _attack(alpha, adaptive, lr, seed, steps, *, targets="all-linear", diverged=None, error=None):
    params = {"original": 100, "released": 100 if alpha is None else 150}
    params["attacked"] = params["released"] + (50 if adaptive and "inject" in adaptive else 0)
    row = {
        "kind": "attack", "lr": lr, "seed": seed, "adaptive": adaptive, "parameters": params,
        "defense": {"alpha": alpha} if alpha is None else {"alpha": alpha, "targets": targets},
        "summary": {"steps_to_threshold": steps, "diverged_at": diverged, "budget": 300,
                    "trainable_parameters": 100, "final": {}, "seconds": 1.0},
        "evals": [],
    }  # fmt: skip
    if error:
        row = {**row, "error": error, "summary": {}}
    return row


def test_flatten_names_variants_and_selections():
    assert flatten(_attack(None, None, 0.1, 0, 20))["variant"] == "undefended"
    assert flatten(_attack(1e4, None, 0.1, 0, None))["variant"] == "defended"
    control = flatten(_attack(None, "control:inject@layers.2", 0.1, 0, 40))
    assert (control["variant"], control["selection"], control["alpha"]) == (
        "undefended+inject",
        "layers.2",
        None,
    )
    fused = flatten(_attack(1e4, "fuse", 0.1, 0, 20, targets=["layers.2"]))
    assert (fused["selection"], fused["params_attacked"]) == ("layers.2", 150)


def test_digits_section_ratios_and_the_control_table():
    rows = []
    for seed, (und, fuse, ctl) in enumerate([(20, 30, 60), (40, 40, 80), (30, 30, 70)]):
        rows += [
            _attack(None, None, 0.1, seed, und),  # median 30 at 0.1
            _attack(None, None, 0.01, seed, 100),  # slower at 0.01: lr* = 0.1
            _attack(1e4, None, 0.1, seed, None, targets=["layers.2"], diverged=2),
            _attack(1e4, None, 0.01, seed, None, targets=["layers.2"], diverged=2),
            _attack(1e4, "fuse", 0.1, seed, fuse, targets=["layers.2"]),  # median 30: 1.00×
            _attack(1e4, "fuse", 0.01, seed, 90, targets=["layers.2"]),
            _attack(None, "control:inject@layers.2", 0.1, seed, ctl),  # median 70: 2.33×
            _attack(None, "control:inject@layers.2", 0.01, seed, 50),  # its own best: 50 at 0.01
        ]
    text = digits_section(rows)
    assert "### Defended: layers.2 (the middle 128×128 layer)" in text
    assert "Undefended best learning rate lr\\* = 0.1: 30 (20, 40, 30) steps." in text
    assert "| defended | 0 | +0.0 % | +50 | 100 | never (div, div, div) | ∞ | — |" in text
    assert "| fuse | 0 | +0.0 % | +50 | 100 | 30 (30, 40, 30) | 1.00× | 0.1 |" in text
    assert (
        "| undefended+inject | +50 | +50.0 % | +50 | 100 | 70 (60, 80, 70) | 2.33× | 0.01 | "
        "50 (50, 50, 50) | 1.67× | 0.01, 0.1 |"
    ) in text
    assert "*fuse* 1.00× (within 1.5×); *undefended+inject* 2.33× (NOT within 1.5×)." in text
    assert "Does what a transform restores depend on α?" not in text  # one α only


def test_smollm2_section_threshold_from_the_undefended_reference():
    def run(variant_alpha, adaptive, lr, losses):
        row = _attack(variant_alpha, adaptive, lr, 0, None)
        row["evals"] = [
            {"step": s, "harmful_loss": v} for s, v in zip((0, 10, 20, 30), losses, strict=True)
        ]
        row["summary"]["final"] = {"harmful_loss": losses[-1]}
        row["summary"]["budget"] = 30
        return row

    rows = [
        run(None, None, 1e-4, [2.5, 2.3, 2.2, 2.1]),  # best: threshold (2.5 + 2.1) / 2 = 2.3
        run(None, None, 3e-5, [2.5, 2.45, 2.4, 2.35]),
        run(1e4, "fuse", 1e-4, [2.5, 2.4, 2.3, 2.2]),  # reaches 2.3 at step 20
    ]
    text = smollm2_section(rows)
    assert "**harmful_loss<=2.3**" in text and "(0.0001: 2.500 → 2.100)" in text
    assert "| fuse | 0.0001 | +0 |" not in text
    assert "| fuse | 0.0001 | 0 | +0.0 % | +50 | 100 | 2.500 / 2.400 / 2.300 / 2.200 | 20 |" in text
    assert "| fuse | 3e-05 | not run (CPU budget) |" in text
    assert "1 of 4 runs are not in the rows yet" in text


def test_native_section_joins_landscape_and_attack_rows():
    def landscape(alpha, mode, adaptive, sigma1, imbalance=None):
        row = {
            "kind": "landscape", "model": "m", "task": "t", "adaptive": adaptive,
            "defense": {"alpha": alpha, "mode": mode, "top_k": 8}, "alpha": alpha,
            "parameters": {"attacked": 1000}, "function_gap": 1e-7, "sigma1": sigma1,
            "converged": True, "measure": {"batch_size": 256, "lanczos_iter": 80},
        }  # fmt: skip
        if imbalance is not None:
            row["imbalance_log10"] = imbalance
        return row

    def attack(alpha, mode, adaptive, lr, steps):
        reason = "reached" if steps else "diverged"
        return {
            "kind": "attack", "optimizer": "adam", "lr": lr, "adaptive": adaptive,
            "defense": {"alpha": alpha, "mode": mode},
            "attack": {"threshold": "harmful_accuracy>=0.9", "steps": 300, "batch_size": 64},
            "summary": {"steps_to_threshold": steps, "budget": 300, "censor_reason": None
                        if steps else reason, "diverged_at": None if steps else 2},
        }  # fmt: skip

    rows = [
        landscape(None, None, None, 10.0, 0.5),
        landscape(1e4, "native", None, 1e8, 4.0),
        attack(None, None, None, 0.1, 20),
        attack(None, None, None, 0.01, 50),
        attack(1e4, "native", None, 0.1, None),
        attack(1e4, "native", None, 0.01, None),
    ]
    assert variant_name(rows[1]) == "native" and variant_name(rows[0]) == "undefended"
    text = native_section(rows)
    assert "## m on t (k = 8)" in text
    assert "| undefended | 1,000 | 1.0e-07 | 1.000e+01 | 1 | yes | 0.50 | 20 (0.1) |" in text
    assert (
        "| native | 1,000 | 1.0e-07 | 1.000e+08 | 1e+07 | yes | 4.00 | never (diverged at 2) |"
        in text
    )
    assert "undefended: 0.01→50, 0.1→20; native: 0.01→never (diverged at 2)" in text


def test_optimizer_grid_section_columns_slowdown_and_ablations():
    def row(alpha, optimizer, lr, steps, *, targets="all-linear", frozen=(), train="all"):
        defense = {"alpha": alpha} if alpha is None else {"alpha": alpha, "targets": targets}
        summary = {"steps_to_threshold": steps, "budget": 300, "diverged_at": None if steps else 2}
        summary["censor_reason"] = None if steps else "diverged"
        attack = {"threshold": "harmful_accuracy>=0.9", "steps": 300, "batch_size": 64,
                  "eval_every": 5, "frozen": list(frozen), "train": train}  # fmt: skip
        return {"kind": "attack", "optimizer": optimizer, "lr": lr, "defense": defense,
                "attack": attack, "summary": summary}  # fmt: skip

    rows = [
        row(None, "sgd", 0.1, 80),
        row(None, "sgd", 1.0, None),
        row(None, "adam", 0.1, 20),
        row(1e4, "sgd", 0.1, None, targets=["layers.2"]),
        row(1e4, "sgd", 1.0, None, targets=["layers.2"]),
        row(1e4, "adam", 0.1, None, targets=["layers.2"]),
        row(1e4, "adam", 0.1, 60, frozen=("layers.0.compensation", "layers.4.compensation")),
        row(None, "adam", 0.1, 75, frozen=("layers.2",)),
    ]
    text = optimizer_grid_section(rows)
    assert "| optimizer | lr | undefended | α=1e4 layers.2 |\n" in text
    assert "| sgd | 0.1 | 80 | never (diverged at 2) |" in text  # optimizers in row order
    assert text.index("| sgd | 0.1 |") < text.index("| adam | 0.1 |")
    assert "| adam | α=1e4 layers.2 | 20 (lr 0.1) | never (diverged at 2) | > 15×" in text
    assert "Ablations (Adam, same grid):" in text
    assert (
        "| optimizer | lr | α=1e4 all-linear, compensation frozen | undefended, layers.2 frozen |"
    ) in text
    assert "| adam | 0.1 | 60 | 75 |" in text


def test_lora_section_rows_per_target_set_and_best_lr_slowdown():
    def row(targets, alpha, lr, steps, trainable):
        summary = {
            "steps_to_threshold": steps,
            "budget": 200,
            "diverged_at": None,
            "censor_reason": None if steps else "budget",
            "trainable_parameters": trainable,
        }
        attack = {
            "optimizer": "adamw",
            "threshold": "harmful_loss<=0.5",
            "steps": 200,
            "batch_size": 16,
            "eval_every": 10,
            "lora_rank": 8,
        }
        return {"kind": "attack", "train": "lora", "lora_targets": targets, "alpha": alpha,
                "lr": lr, "attack": attack, "summary": summary, "data": {"pretrain_task": "p"},
                "pretrain": {"benign_loss": 4.1e-4 if lr < 0.02 else 3.9e-4, "harmful_loss": 3.0}}  # fmt: skip

    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    rows = [
        row(attention, None, 0.01, 30, 7168),
        row(attention, None, 0.03, 20, 7168),
        row(attention, 1e4, 0.01, 40, 7168),
        row(attention, 1e4, 0.03, 40, 7168),
        row(["all-linear"], None, 0.01, 20, 16384),
        row(["all-linear"], None, 0.03, 10, 16384),
        row(["all-linear"], 1e4, 0.01, 120, 23552),
        row(["all-linear"], 1e4, 0.03, None, 23552),
    ]
    text = lora_section(rows)
    assert "Steps to harmful_loss<=0.5 on held-out language-H sequences (AdamW, LoRA r = 8" in text
    assert "pretrains the model on p (held-out loss after pretraining: benign 0.00039 … " in text
    assert "| LoRA targets | model | trainable | lr 0.01 | lr 0.03 |" in text
    assert "| attention-only | undefended | 7,168 | 30 | 20 |" in text
    assert "| all-linear | α = 1e4 | 23,552 | 120 | > 200 |" in text
    # best over the grid: 20 (lr 0.03) undefended vs 40 (the first lr reaching it) defended
    assert "| attention-only | 20 (lr 0.03) | 40 (lr 0.01) | 2× (40 vs 20 steps) |" in text
    assert "| all-linear | 10 (lr 0.03) | 120 (lr 0.01) | 12× (120 vs 10 steps) |" in text
    assert lora_section([{**rows[0], "train": "all"}]) == "_Not run yet._\n"


def test_ladder_section_one_line_per_alpha_and_seed():
    def row(alpha, seed, steps, best, diverged=None):
        rungs = [{"threshold": f"harmful_accuracy>={r}", "steps": s}
                 for r, s in zip(("0.5", "0.9"), steps, strict=True)]  # fmt: skip
        summary = {"ladder": {"rungs": rungs, "best": best}, "diverged_at": diverged}
        return {"kind": "attack", "alpha": alpha, "seed": seed, "summary": summary}

    rows = [row(1e4, 1, (5, None), 0.8, 7), row(None, 0, (5, 10), 0.96), row(1e4, 0, (5, 5), 0.97)]
    lines = ladder_section(rows).splitlines()
    assert lines[0] == "| α | seed | steps to ≥ 0.5 | steps to ≥ 0.9 | best | diverged |"
    assert lines[2:] == [
        "| undefended | 0 | 5 | 10 | 0.960 | no |",
        "| 10000 | 0 | 5 | 5 | 0.970 | no |",
        "| 10000 | 1 | 5 | — | 0.800 | 7 |",
    ]
