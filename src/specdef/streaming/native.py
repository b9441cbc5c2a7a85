"""Native mode of :mod:`specdef.streaming.defend`: a first pass computes each symmetric pair's transform
(per-KV-head bases or a diagonal: a few KB) and checks precision, holding one pair's tensors; the
second pass rewrites every touched tensor alone, applying the transforms of all pairs it belongs to
in pair order (so overlapping pairs, e.g. the middle layer of a ReLU MLP, compose as in memory).
The plan is saved in the staging dir, so a resumed run does not recompute it (each pair's random
sketch is seeded by the pair's name, so a recomputed plan would be the same). The per-pair record
and precision guard are :func:`specdef.native.apply.pair_record` / ``check_pair``, as in memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from specdef.defense.config import SpecDefConfig
from specdef.defense.step import layer_generator
from specdef.errors import SpecdefError
from specdef.linalg import symmetry as sym
from specdef.native.apply import PairRecord, check_pair, pair_record
from specdef.native.pairs import SymmetricPair, inflated_index
from specdef.streaming import shards as sio
from specdef.streaming.resume import Staging
from specdef.streaming.shards import SAFETENSORS_DTYPES, Checkpoint, Item, write_shards
from specdef.utils.files import file_sha256, write_json_atomic
from specdef.utils.progress import track


def _keys(pair: SymmetricPair, source: Checkpoint) -> dict[str, str]:
    if pair.layout == "conv":
        raise SpecdefError(
            f"Pair {pair.name}: Conv2d pairs are deformed in memory only; defend without "
            "--streaming."
        )
    keys = {
        "w": f"{pair.inflated}.weight",
        "b": f"{pair.inflated}.bias",
        "o": f"{pair.compensating}.weight",
    }
    if keys["b"] not in source.specs:
        del keys["b"]
    for role in ("w", "o"):
        if keys[role] not in source.specs:
            raise SpecdefError(
                f"Pair {pair.name}: tensor {keys[role]!r} is not in the checkpoint (tied or renamed "
                "weights cannot be streamed); exclude the pair with --exclude."
            )
    return keys


def _linear_view(pair: SymmetricPair, role: str, x: torch.Tensor) -> torch.Tensor:
    """One of the pair's tensors (stored layout) as the Linear-layout piece the symmetry acts on."""
    index = inflated_index(pair)
    if index is None or (role == "o" and pair.layout != "gpt2"):
        return x
    if role == "o":
        return x.T
    if role == "w" and pair.layout == "gpt2":
        return x[:, index].T
    return x[index]  # a fused Linear's rows, or the entries of the bias


def _transform(
    pair: SymmetricPair, role: str, x: torch.Tensor, transform: Any, alpha: float
) -> torch.Tensor:
    """Apply one pair's transform to one of its tensors (stored layout, float64), out of place.
    The other two tensors of the pair are passed as empty placeholders of the right width."""
    lin = _linear_view(pair, role, x)
    if pair.kind == "attention":
        rows = sum(b.shape[0] for b in transform)
        placeholder_w = torch.empty(rows, 0, dtype=torch.float64)
        placeholder_o = torch.empty(0, pair.heads * rows // pair.kv_heads, dtype=torch.float64)
        t = {
            "w": sym.PairTensors(lin, None, placeholder_o),
            "b": sym.PairTensors(placeholder_w, lin, placeholder_o),
            "o": sym.PairTensors(placeholder_w, None, lin),
        }[role]
        done = sym.apply_attention(
            t, transform, alpha=alpha, heads=pair.heads, kv_heads=pair.kv_heads
        )
        new = {"w": done.inflated, "b": done.bias, "o": done.compensating}[role]
    else:
        scale = transform if role == "b" else transform.unsqueeze(1 if role == "w" else 0)
        new = lin / scale if role == "o" else lin * scale
    assert new is not None
    index = inflated_index(pair)
    if index is None or (role == "o" and pair.layout != "gpt2"):
        return new
    if role == "o":
        return new.T.contiguous()
    out = x.clone()
    if role == "w" and pair.layout == "gpt2":
        out[:, index] = new.T
    else:
        out[index] = new
    return out


def run_native(
    source: Checkpoint, pairs: list[SymmetricPair], staging: Staging, config: SpecDefConfig
) -> list[PairRecord]:
    """Deform ``pairs`` of ``source`` into ``staging`` (planning pass, then rewriting pass)."""
    keys = [_keys(p, source) for p in pairs]
    roles: dict[str, list[tuple[int, str]]] = {}
    for i, k in enumerate(keys):
        for role, key in k.items():
            roles.setdefault(key, []).append((i, role))
    transforms: list[Any] = []

    def transformed(key: str, x: torch.Tensor, upto: int) -> torch.Tensor:
        """Tensor ``key`` (as read) after the transforms of the pairs before ``upto``, float64."""
        x = x.to(torch.float64)
        for i, role in roles[key]:
            if i < upto:
                x = _transform(pairs[i], role, x, transforms[i], config.alpha)
        return x

    def current(key: str, upto: int) -> torch.Tensor:
        return transformed(key, sio.read_tensor(source, key), upto)

    saved = staging.load_plan()
    if saved is not None and saved[0]["pairs"] == [p.name for p in pairs]:
        records = [PairRecord(**record) for record in saved[0]["records"]]
        transforms += _unflatten(pairs, load_file(str(saved[1])))
    else:
        records = _plan(source, pairs, keys, transforms, current, config)
        _save_plan(staging, pairs, transforms, records)
    items = {
        key: Item(
            key,
            [(key, *source.specs[key])],
            lambda x, key=key: {
                key: transformed(key, x, len(pairs)).to(SAFETENSORS_DTYPES[source.specs[key][0]])
            },
        )
        for key in roles
    }
    write_shards(source, staging, items, reports=[])
    return records


def _plan(
    source: Checkpoint,
    pairs: list[SymmetricPair],
    keys: list[dict[str, str]],
    transforms: list[Any],
    current: Callable[[str, int], torch.Tensor],
    config: SpecDefConfig,
) -> list[PairRecord]:
    """First pass: each pair's transform (appended to ``transforms``) and its precision check."""
    records = []
    for i, (pair, k) in enumerate(track(list(zip(pairs, keys, strict=True)), "planning pairs")):
        stored = {role: current(key, i) for role, key in k.items()}
        lin = {role: _linear_view(pair, role, x) for role, x in stored.items()}
        t = sym.PairTensors(lin["w"], lin.get("b"), lin["o"])
        if pair.kind == "attention":
            transforms.append(
                sym.attention_bases(
                    t,
                    top_k=config.top_k,
                    heads=pair.heads,
                    kv_heads=pair.kv_heads,
                    method=config.method,
                    generator=layer_generator(config.seed, pair.name),
                    name=pair.inflated,
                )
            )
        else:
            transforms.append(
                sym.diagonal_scale(t.inflated, t.bias, alpha=config.alpha, top_k=config.top_k)
            )
        dtype = SAFETENSORS_DTYPES[source.specs[k["w"]][0]]
        after = {
            r: _linear_view(pair, r, _transform(pair, r, x, transforms[i], config.alpha))
            for r, x in stored.items()
        }
        record = pair_record(
            pair, t, sym.PairTensors(after["w"], after.get("b"), after["o"]), dtype, config
        )
        check_pair(record, dtype, config)
        records.append(record)
        del stored, lin, t, after
    return records


def _save_plan(
    staging: Staging, pairs: list[SymmetricPair], transforms: list[Any], records: list[PairRecord]
) -> None:
    record_path, tensor_path = staging.plan_paths()
    flat: dict[str, torch.Tensor] = {}
    for i, transform in enumerate(transforms):
        parts = transform if isinstance(transform, list) else [transform]
        flat.update({f"{i}.{j}": part.contiguous() for j, part in enumerate(parts)})
    partial = tensor_path.with_suffix(".partial")
    save_file(flat, str(partial))
    partial.replace(tensor_path)
    names = [p.name for p in pairs]
    write_json_atomic(
        record_path,
        {
            "pairs": names,
            "records": [r.as_dict() for r in records],
            "sha256": file_sha256(tensor_path),
        },
    )


def _unflatten(pairs: list[SymmetricPair], flat: dict[str, torch.Tensor]) -> list[Any]:
    out: list[Any] = []
    for i, pair in enumerate(pairs):
        parts = [flat[f"{i}.{j}"] for j in range(sum(k.startswith(f"{i}.") for k in flat))]
        out.append(parts if pair.kind == "attention" else parts[0])
    return out
