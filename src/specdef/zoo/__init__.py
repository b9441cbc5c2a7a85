"""The offline zoo, real models and datasets by name, never downloaded: models, datasets, text, images,
permutation, hf, language and vision builders, user data and its encoding, evaluation; a checked cache (_cache, in ``$SPECDEF_CACHE``).
Re-exports ``load_model``, ``load_tokenizer``, ``load_task``, ``load_prompts`` … as a facade.
"""

from specdef.zoo._cache import cache_root
from specdef.zoo.datasets import (
    TASKS,
    list_datasets,
    load_task,
    task_digest,
    task_names,
)
from specdef.zoo.encoding import encode_pair, encode_prompt
from specdef.zoo.images import FashionMnistMissing
from specdef.zoo.models import (
    ModelInfo,
    build_record,
    check_pairing,
    list_models,
    load_model,
    load_tokenizer,
    model_info,
    model_names,
    prepare,
)
from specdef.zoo.text import PROMPT_SETS, Pair, load_prompts

__all__ = [
    "PROMPT_SETS",
    "TASKS",
    "check_pairing",
    "FashionMnistMissing",
    "ModelInfo",
    "Pair",
    "build_record",
    "cache_root",
    "encode_pair",
    "encode_prompt",
    "list_datasets",
    "list_models",
    "load_model",
    "load_prompts",
    "load_task",
    "load_tokenizer",
    "model_info",
    "model_names",
    "prepare",
    "task_digest",
    "task_names",
]
