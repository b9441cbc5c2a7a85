"""Where a model's exact linear symmetries are, and how their tensors are read and written.

:func:`find_symmetric_pairs` walks the modules for the three kinds :mod:`specdef.native.apply` deforms
(attention V/O per KV head, gated-MLP up/down, Linear→ReLU→Linear); :func:`select_pairs` maps a
layer selection onto them; :func:`read_pair` / :func:`stored_pair` / :func:`write_pair` move a
pair's tensors between the model (or a checkpoint) and the Linear-layout float64
:class:`specdef.linalg.symmetry.PairTensors` the symmetry math works on. Public through
:mod:`specdef.native.apply`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from specdef.defense.layer import DefendedLinear
from specdef.defense.targets import ALL_LINEAR, select_targets
from specdef.errors import SpecdefError
from specdef.linalg import symmetry as sym

KINDS = ("attention", "gated_mlp", "relu_mlp")
# Activations f with f(c·x) = c·f(x) for every c > 0: a positive diagonal passes through them.
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)
# ... and per-channel maps that commute with a positive per-channel scale (between two Conv2d)
_CHANNELWISE = (nn.MaxPool2d, nn.Dropout2d)


@dataclass(frozen=True)
class SymmetricPair:
    """Two modules joined by an exact linear symmetry.

    ``inflated`` is the module whose weight is deformed (V, up, or the first ReLU layer);
    ``compensating`` absorbs the inverse (O, down, or the next layer). ``heads`` / ``kv_heads`` are
    set for attention pairs. ``layout`` is ``"linear"`` (weights stored out×in), ``"conv"`` (two
    Conv2d joined by ReLU / max-pooling: the diagonal scales the first one's output channels and
    the second one's input channels), ``"fused"``
    (a Linear whose output rows hold more than the inflated side: V inside a fused QKV projection,
    ``up`` inside Phi-3's ``gate_up_proj``) or ``"gpt2"`` (``Conv1D`` weights stored in×out, V a
    slice of ``c_attn``'s output columns). For ``"fused"`` and ``"gpt2"`` the inflated side is the
    output features ``v_offset + i·v_stride + j`` for ``i < v_count``, ``j < v_block``
    (:func:`inflated_index`): one contiguous block, or one block per KV head when the projection
    interleaves Q, K and V per head (GPT-NeoX, Falcon).
    """

    kind: str
    inflated: str
    compensating: str
    heads: int = 0
    kv_heads: int = 0
    layout: str = "linear"
    v_offset: int = 0
    v_block: int = 0
    v_count: int = 1
    v_stride: int = 0

    @property
    def name(self) -> str:
        return f"{self.inflated}+{self.compensating}"


def inflated_index(pair: SymmetricPair) -> torch.Tensor | None:
    """The output features of the inflated module that form the pair's inflated side (rows of a
    ``"fused"`` Linear weight, columns of a ``"gpt2"`` Conv1D weight, entries of the bias), or
    ``None`` when the whole module is (``"linear"``)."""
    if pair.layout in ("linear", "conv"):
        return None
    starts = pair.v_offset + pair.v_stride * torch.arange(pair.v_count)
    return (starts.unsqueeze(1) + torch.arange(pair.v_block)).flatten()


# --------------------------------------------------------------------------- discovery


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _linears(children: dict[str, nn.Module], *names: str) -> bool:
    return all(isinstance(children.get(n), nn.Linear) for n in names)


def _int(*values: object) -> int:
    """The first of ``values`` that is a positive int (module attributes, then config fields)."""
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _separate_vo(
    prefix: str, module: nn.Module, children: dict[str, nn.Module]
) -> SymmetricPair | None:
    """Separate V and O projections: ``v_proj``/``o_proj`` (Llama family, ViT), ``v_proj``/
    ``out_proj`` (OPT, CLIP, Whisper, BART), ``v``/``o`` (T5)."""
    config = getattr(module, "config", None)
    for v_name, o_name in (("v_proj", "o_proj"), ("v_proj", "out_proj"), ("v", "o")):
        if not _linears(children, v_name, o_name):
            continue
        v, o = children[v_name], children[o_name]
        assert isinstance(v, nn.Linear) and isinstance(o, nn.Linear)
        if "v_norm" in children:  # a norm on V (some recent models) breaks V → M·V
            return None
        heads = _int(
            getattr(module, "num_heads", None), getattr(module, "n_heads", None),
            getattr(config, "num_attention_heads", None), getattr(module, "heads", None),
        )  # fmt: skip
        kv_heads = _int(getattr(config, "num_key_value_heads", None)) or heads
        if heads <= 0:
            return None
        head_dim = o.in_features // heads
        if head_dim * heads != o.in_features or head_dim * kv_heads != v.out_features:
            return None
        return SymmetricPair("attention", prefix + v_name, prefix + o_name, heads, kv_heads)
    return None


def _fused_qkv(
    prefix: str, module: nn.Module, children: dict[str, nn.Module]
) -> SymmetricPair | None:
    """V inside a fused QKV projection: Phi-3 ``qkv_proj`` (``[Q | K | V]``), GPT-NeoX
    ``query_key_value`` (``[q k v]`` per head), Falcon ``query_key_value`` (all three layouts)."""
    config = getattr(module, "config", None)
    heads = _int(getattr(module, "num_heads", None), getattr(config, "num_attention_heads", None))
    names = next(
        (
            n
            for n in (("qkv_proj", "o_proj"), ("query_key_value", "dense"))
            if _linears(children, *n)
        ),
        None,
    )
    if heads <= 0 or names is None:
        return None
    qkv, o = children[names[0]], children[names[1]]
    assert isinstance(qkv, nn.Linear) and isinstance(o, nn.Linear)
    hd = o.in_features // heads
    layout: dict[str, int]
    if names[0] == "qkv_proj":  # Phi-3: [Q | K | V]
        kv = _int(getattr(module, "num_key_value_heads", None)) or heads
        layout = {"v_offset": (heads + kv) * hd, "v_block": kv * hd}
    elif getattr(module, "new_decoder_architecture", False):  # Falcon-40B+: [q … q k v] per group
        kv = _int(getattr(module, "num_kv_heads", None)) or heads
        group = heads // kv + 2
        layout = {
            "v_offset": (group - 1) * hd,
            "v_block": hd,
            "v_count": kv,
            "v_stride": group * hd,
        }
    elif getattr(module, "multi_query", False):  # Falcon-7B: [Q | k | v]
        kv = 1
        layout = {"v_offset": (heads + 1) * hd, "v_block": hd}
    else:  # GPT-NeoX and multi-head Falcon: [q k v] per head
        kv = heads
        layout = {"v_offset": 2 * hd, "v_block": hd, "v_count": heads, "v_stride": 3 * hd}
    pair = SymmetricPair(
        "attention", prefix + names[0], prefix + names[1], heads, kv, "fused", **layout
    )
    index = inflated_index(pair)
    assert index is not None
    if hd * heads != o.in_features or int(index.max()) >= qkv.out_features:
        return None
    return pair


def _attention_pair(name: str, module: nn.Module) -> SymmetricPair | None:
    prefix = f"{name}." if name else ""
    children = dict(module.named_children())
    pair = _separate_vo(prefix, module, children) or _fused_qkv(prefix, module, children)
    if pair is not None:
        return pair
    if _is_conv1d(children.get("c_attn", nn.Identity())) and _is_conv1d(
        children.get("c_proj", nn.Identity())
    ):
        heads = int(getattr(module, "num_heads", 0) or 0)
        embed = int(getattr(module, "embed_dim", 0) or 0)
        c_attn = children["c_attn"]
        if heads <= 0 or embed <= 0 or c_attn.nf % embed:  # type: ignore[operator]
            return None
        offset = int(c_attn.nf) - embed  # type: ignore[arg-type]
        return SymmetricPair(
            "attention", prefix + "c_attn", prefix + "c_proj", heads, heads, "gpt2", offset, embed
        )
    self_attn, output = children.get("self"), children.get("output")
    if self_attn is not None and output is not None:
        value, dense = getattr(self_attn, "value", None), getattr(output, "dense", None)
        heads = int(getattr(self_attn, "num_attention_heads", 0) or 0)
        if isinstance(value, nn.Linear) and isinstance(dense, nn.Linear) and heads > 0:
            return SymmetricPair(
                "attention", prefix + "self.value", prefix + "output.dense", heads, heads
            )
    return None


# (first, activation, second) children of MLP modules whose forward is second(act(first(x))):
# OPT's decoder layer, CLIP/Whisper/BART MLPs (kept only when the activation is ReLU), T5.
_NAMED_MLPS = (("fc1", "activation_fn", "fc2"), ("wi", "act", "wo"))
# (gate, up, down) children of gated MLPs down(act(gate(x)) ⊙ up(x)).
_GATED_MLPS = (("gate_proj", "up_proj", "down_proj"), ("wi_0", "wi_1", "wo"))


def _mlp_pairs(name: str, module: nn.Module) -> list[SymmetricPair]:
    prefix = f"{name}." if name else ""
    children = dict(module.named_children())
    for gate_name, up_name, down_name in _GATED_MLPS:
        if _linears(children, gate_name, up_name, down_name):
            return [SymmetricPair("gated_mlp", prefix + up_name, prefix + down_name)]
    gate_up, down = children.get("gate_up_proj"), children.get("down_proj")
    if isinstance(gate_up, nn.Linear) and isinstance(down, nn.Linear):  # Phi-3: up = second half
        width = down.in_features
        if gate_up.out_features == 2 * width:
            return [
                SymmetricPair(
                    "gated_mlp",
                    prefix + "gate_up_proj",
                    prefix + "down_proj",
                    layout="fused",
                    v_offset=width,
                    v_block=width,
                )
            ]
    for w1_name, act_name, w2_name in _NAMED_MLPS:
        if _linears(children, w1_name, w2_name) and isinstance(
            children.get(act_name), nn.ReLU | nn.LeakyReLU
        ):
            return [SymmetricPair("relu_mlp", prefix + w1_name, prefix + w2_name)]
    if not isinstance(module, nn.Sequential):
        return []
    pairs = []
    items = list(children.items())
    for i, (first_name, first) in enumerate(items):
        kind = nn.Linear if isinstance(first, nn.Linear) else nn.Conv2d
        if not isinstance(first, nn.Linear | nn.Conv2d):
            continue
        between = (*_HOMOGENEOUS, nn.Dropout) + (_CHANNELWISE if kind is nn.Conv2d else ())
        j = i + 1
        saw_activation = False
        while j < len(items) and isinstance(items[j][1], between):
            saw_activation = saw_activation or isinstance(items[j][1], nn.ReLU | nn.LeakyReLU)
            j += 1
        if saw_activation and j < len(items) and isinstance(items[j][1], kind):
            second = items[j][1]
            if kind is nn.Conv2d and not _plain_conv(first, second):
                continue
            layout = "conv" if kind is nn.Conv2d else "linear"
            pairs.append(
                SymmetricPair("relu_mlp", prefix + first_name, prefix + items[j][0], layout=layout)
            )
    return pairs


def _plain_conv(first: nn.Module, second: nn.Module) -> bool:
    """Ungrouped convolutions whose channels match (a grouped one mixes no channels across groups,
    but its weight is not one channel-by-channel matrix)."""
    return (
        isinstance(first, nn.Conv2d)
        and isinstance(second, nn.Conv2d)
        and first.groups == second.groups == 1
        and first.out_channels == second.in_channels
    )


def find_symmetric_pairs(model: nn.Module) -> list[SymmetricPair]:
    """Every exact linear symmetry specdef can use in ``model``, in module order."""
    pairs: list[SymmetricPair] = []
    for name, module in model.named_modules():
        pair = _attention_pair(name, module)
        if pair is not None:
            pairs.append(pair)
        pairs.extend(_mlp_pairs(name, module))
    return pairs


def select_pairs(
    model: nn.Module,
    targets: str | Sequence[str] | None = None,
    *,
    exclude: str | Sequence[str] = (),
) -> list[SymmetricPair]:
    """The symmetric pairs a selection touches, in module order.

    ``targets`` follows :func:`specdef.defense.targets.select_targets` (names / dotted suffixes, regex,
    ``"preset:NAME"``); ``None`` or ``"all-linear"`` means every pair in the model. A pair is
    selected when either of its modules is (selecting ``o_proj`` selects the V/O pair; V is always
    the inflated side). Raises :class:`SpecdefError` when a selected layer has no usable symmetry
    (e.g. ``gate_proj``, whose SiLU allows no scaling, GPT-2's or BERT's GELU MLP, ``q_proj``):
    native mode cannot defend it, and silently skipping it would leave it undefended.
    """
    pairs = find_symmetric_pairs(model)
    usable = sorted({n.rsplit(".", 1)[-1] for p in pairs for n in (p.inflated, p.compensating)})
    if not pairs:
        raise SpecdefError(
            f"Native mode found no exact linear symmetry in {type(model).__name__} (expected "
            "attention V/O, gated-MLP up/down or Linear→ReLU→Linear layers); use --mode algorithm1."
        )
    if targets is None or (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        chosen = list(pairs)
        if exclude:
            excluded = set(select_targets(model, ALL_LINEAR, exclude=()))
            excluded -= set(select_targets(model, ALL_LINEAR, exclude=exclude))
            chosen = [p for p in pairs if not {p.inflated, p.compensating} & excluded]
    else:
        names = select_targets(model, targets, exclude=exclude)
        members = {m: p for p in pairs for m in (p.inflated, p.compensating)}
        orphans = [n for n in names if n not in members]
        if orphans:
            raise SpecdefError(
                f"Native mode needs an exact linear symmetry, but {orphans[0]!r}"
                + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else "")
                + f" has none; exclude it, use --mode algorithm1, or select layers ending in: "
                f"{', '.join(usable)}."
            )
        chosen = [p for p in pairs if p.inflated in names or p.compensating in names]
    if not chosen:
        raise SpecdefError("The exclusions remove every symmetric pair; loosen --exclude.")
    return chosen


# --------------------------------------------------------------------------- tensor access


def _params(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    module = model.get_submodule(name)
    if isinstance(module, DefendedLinear):  # its .weight is a computed product: nothing to write
        raise SpecdefError(
            f"{name} is an Algorithm-1 defended layer; native deformation needs the undefended "
            "model (undo or fuse it first)."
        )
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor):
        raise SpecdefError(f"{name}: expected a layer with a weight tensor, found {module!r}.")
    return weight, bias if isinstance(bias, torch.Tensor) else None


def _f64(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().to(torch.float64, copy=True)


def read_pair(model: nn.Module, pair: SymmetricPair) -> sym.PairTensors:
    """The pair's tensors in Linear layout (out×in), float64 copies."""
    (w1, b1), (w2, _) = _params(model, pair.inflated), _params(model, pair.compensating)
    return stored_pair(pair, w1, b1, w2)


def stored_pair(
    pair: SymmetricPair, weight: torch.Tensor, bias: torch.Tensor | None, compensating: torch.Tensor
) -> sym.PairTensors:
    """The pair's tensors as stored (the inflated module's weight and bias, the compensating
    module's weight; GPT-2 ``Conv1D`` layout for ``pair.layout == "gpt2"``) → Linear layout, float64
    copies. Used on a live model and on tensors read from a checkpoint."""
    w1, b1, w2 = weight.detach(), None if bias is None else bias.detach(), compensating.detach()
    index = inflated_index(pair)
    if pair.layout == "gpt2":
        assert index is not None
        return sym.PairTensors(
            w1[:, index].T.to(torch.float64, copy=True),
            None if b1 is None else b1[index].to(torch.float64, copy=True),
            w2.T.to(torch.float64, copy=True),
        )
    if pair.layout == "conv":  # rows: output channels of the first, columns: inputs of the second
        return sym.PairTensors(
            w1.reshape(w1.shape[0], -1).to(torch.float64, copy=True),
            _f64(b1),
            w2.movedim(1, -1).reshape(-1, w2.shape[1]).to(torch.float64, copy=True),
        )
    if index is not None:  # fused: the inflated side is some of the output rows
        w1, b1 = w1[index], None if b1 is None else b1[index]
    return sym.PairTensors(
        w1.to(torch.float64, copy=True), _f64(b1), w2.to(torch.float64, copy=True)
    )


@torch.no_grad()
def write_pair(model: nn.Module, pair: SymmetricPair, tensors: sym.PairTensors) -> None:
    """Copy ``tensors`` (Linear layout) into the model, cast to each parameter's dtype."""
    (w1, b1), (w2, _) = _params(model, pair.inflated), _params(model, pair.compensating)
    index = inflated_index(pair)
    if pair.layout == "gpt2":
        assert index is not None
        w1[:, index] = tensors.inflated.T.to(w1.dtype)
        if b1 is not None and tensors.bias is not None:
            b1[index] = tensors.bias.to(b1.dtype)
        w2.copy_(tensors.compensating.T.to(w2.dtype))
        return
    if pair.layout == "conv":
        w1.copy_(tensors.inflated.reshape(w1.shape).to(w1.dtype))
        if b1 is not None and tensors.bias is not None:
            b1.copy_(tensors.bias.to(b1.dtype))
        moved = (w2.shape[0], *w2.shape[2:], w2.shape[1])
        w2.copy_(tensors.compensating.reshape(moved).movedim(-1, 1).to(w2.dtype))
        return
    if index is not None:
        w1[index] = tensors.inflated.to(w1.dtype)
        if b1 is not None and tensors.bias is not None:
            b1[index] = tensors.bias.to(b1.dtype)
        w2.copy_(tensors.compensating.to(w2.dtype))
        return
    w1.copy_(tensors.inflated.to(w1.dtype))
    if b1 is not None and tensors.bias is not None:
        b1.copy_(tensors.bias.to(b1.dtype))
    w2.copy_(tensors.compensating.to(w2.dtype))


def pair_dtype(model: nn.Module, pair: SymmetricPair) -> torch.dtype:
    """The stored dtype of the pair's inflated weight."""
    return _params(model, pair.inflated)[0].dtype
