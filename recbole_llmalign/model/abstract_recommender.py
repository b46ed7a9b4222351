"""What every frozen-backbone LLM recommender of the plugin needs, built once.

``FrozenBackboneLLMRecommender`` is the shared base of AlignLLMRec, AlignLLMRecCTR and
AlignGenRec (as RecBole-GNN's ``GeneralGraphRecommender`` is for its graph models):
- the trained AlignSASRec backbone, loaded from ``backbone_checkpoint``, checked against the
  dataset and frozen; with ``refit_backbone_checkpoint`` a second one (the first continued on
  every training target) that evaluation reads instead (``backbone`` switches with the mode);
  with ``cross_fit_backbone_checkpoints`` (cross-fitting) K fold backbones, each trained without
  one fold of users, and training reads, for each sample, the one that never saw its user
  (``cross_fitted``), while evaluation reads ``backbone_checkpoint`` (trained on every user), or,
  with ``cross_fit_evaluation: folds``, the same fold backbones, each user's the one that never saw
  them (``fold_routed``), so evaluation reads backbones exactly as training did;
- the decoder-only LLM (cut to ``llm_layers``, LoRA adapters when ``lora_r > 0``) with its
  tokenizer, input embeddings, decoder stack and LM head, its base weights frozen, in the dtype
  ``llm_dtype`` resolves to for the run's device; ``llm_autocast()`` is the context every LLM
  forward runs in (autocast when those weights are bf16/fp16; see ``recbole_llmalign/devices.py``);
- backbone user vectors, item titles, left padding and position ids;
- ``train()`` that keeps the frozen parts in eval mode, and checkpoints that hold only the
  trainable parameters plus the buffers a subclass lists in ``kept_buffers``.
Its keys are documented in ``properties/base/FrozenBackboneLLMRecommender.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, ContextManager

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from recbole_llmalign.data.item_text import item_texts
from recbole_llmalign.data.sampling import parse_user_fold, user_folds
from recbole_llmalign.devices import HOST, llm_autocast
from recbole_llmalign.llm.loader import load_causal_lm

CROSS_FIT_EVALUATIONS = ("full", "folds")  # what ranks valid/test under cross-fitting (cross_fit_evaluation)


class FoldRoutedBackbone(nn.Module):
    """The cross-fitting fold backbones evaluated as one model: every user ranked by the fold backbone that
    never saw them. Why: under ``cross_fit_evaluation: folds`` that is the backbone the LLM model ranks on,
    so its "own backbone" figures (``evaluate_backbone``) come from it. Holds references only."""

    def __init__(self, backbones: nn.ModuleList, user_fold: torch.Tensor, user_field: str) -> None:
        super().__init__()
        self.parts = tuple(backbones)  # a tuple, not submodules: the owning model registers them
        self.user_fold, self.user_field = user_fold, user_field
        self.hidden_size = self.parts[0].hidden_size

    def train(self, mode: bool = True) -> FoldRoutedBackbone:
        for part in self.parts:
            part.train(mode)
        return super().train(mode)

    def full_sort_predict(self, interaction: Any) -> torch.Tensor:
        return route_by_fold(interaction, folds_of(interaction, self.user_fold, self.user_field),
                             lambda fold, rows: self.parts[fold].full_sort_predict(rows))

    def predict(self, interaction: Any) -> torch.Tensor:
        return route_by_fold(interaction, folds_of(interaction, self.user_fold, self.user_field),
                             lambda fold, rows: self.parts[fold].predict(rows))


def folds_of(interaction: Any, user_fold: torch.Tensor, user_field: str) -> torch.Tensor:
    """[B] each row's fold. A history without a known user (recommend or serving a new user) goes to fold 0,
    whose backbone, like every fold's, never saw it; callers with a dataset user pass its id."""
    if user_field in interaction:
        return user_fold[interaction[user_field]]
    return torch.zeros(len(interaction), dtype=torch.long, device=user_fold.device)


def route_by_fold(interaction: Any, folds: torch.Tensor, score: Any) -> torch.Tensor:
    """``score(fold, rows)`` for each fold's rows of ``interaction`` (``folds`` [B]: each row's fold), put
    back in the input order: scores [B, ...]."""
    out: torch.Tensor | None = None
    for fold in folds.unique().tolist():
        rows = torch.nonzero(folds == fold).squeeze(1)
        part = score(int(fold), interaction[rows])
        if out is None:
            out = part.new_empty((len(folds), *part.shape[1:]))
        out[rows] = part
    assert out is not None, "route_by_fold: an empty batch"
    return out


def load_backbone(checkpoint_path: str | None, dataset: Any, model_name: str = "This model",
                  trust: bool = False, key: str = "backbone_checkpoint") -> tuple[nn.Module, Any]:
    """(a trained AlignSASRec from its RecBole checkpoint, frozen and checked against ``dataset``; its config)."""
    from recbole_llmalign.compat import load_checkpoint
    from recbole_llmalign.model.align_sasrec import AlignSASRec

    if not checkpoint_path:
        raise ValueError(
            f"{model_name} needs a trained AlignSASRec: run it through run_recbole_llmalign (which trains and caches "
            "one) or pass --backbone_checkpoint=saved/AlignSASRec-<time>.pth from `--model=AlignSASRec` on the same dataset."
        )
    if not Path(checkpoint_path).is_file():
        raise FileNotFoundError(f"{key} {checkpoint_path} does not exist; point it at an AlignSASRec .pth file.")
    checkpoint = load_checkpoint(checkpoint_path, map_location="cpu", trust=trust)
    backbone_config = checkpoint["config"]
    if "init_checkpoint" in backbone_config:  # a refit's warm start: its weights are all in this file already
        backbone_config["init_checkpoint"] = None
    if backbone_config["model"] != "AlignSASRec":
        raise ValueError(f"backbone_checkpoint holds a {backbone_config['model']}, not an AlignSASRec.")
    rows = checkpoint["state_dict"]["item_embedding.weight"].shape[0]
    if rows != dataset.item_num:
        raise ValueError(
            f"backbone_checkpoint has {rows} item rows but this dataset has {dataset.item_num}: it was trained on "
            "another dataset or filtering. Train AlignSASRec on the same dataset config."
        )
    backbone = AlignSASRec(backbone_config, dataset)
    backbone.load_state_dict(checkpoint["state_dict"])
    backbone.requires_grad_(False)
    return backbone.eval(), backbone_config


def checkpoint_list(value: Any) -> list[str]:
    """A list-of-paths key (``cross_fit_backbone_checkpoints``) from YAML or the command line: a list, or a string
    of comma-separated paths (brackets and quotes allowed, as ``--key=[a.pth,b.pth]`` arrives); [] when unset."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [part.strip().strip("'\"") for part in value.strip().strip("[]").split(",") if part.strip().strip("'\"")]
    if not all(isinstance(part, (str, Path)) for part in value):
        raise ValueError(f"expected a list of checkpoint paths, got {value!r}.")
    return [str(part) for part in value]


class FrozenBackboneLLMRecommender(SequentialRecommender):
    """Frozen AlignSASRec + frozen decoder-only LLM (LoRA optional); subclasses add what they train."""

    backbone_model: ClassVar[str] = "AlignSASRec"  # trained and cached by quick_start when backbone_checkpoint is empty
    kept_buffers: ClassVar[tuple[str, ...]] = ()  # buffers saved beside the trainable parameters
    # whether evaluation may read a refit backbone (AlignLLMRec: its scores are the backbone's plus a residual;
    # AlignGenRec's item codes are fit on its backbone's vectors, so another backbone would not match them)
    supports_backbone_refit: ClassVar[bool] = False
    # whether training may read cross-fitting fold backbones (its calculate_loss goes through cross_fitted)
    supports_cross_fitting: ClassVar[bool] = False

    def __init__(self, config: Any, dataset: Any) -> None:
        super().__init__(config, dataset)
        trust = bool(config["trust_checkpoint"])
        self.fit_backbone, backbone_config = load_backbone(config["backbone_checkpoint"], dataset, type(self).__name__, trust)
        self.fit_backbone_config = backbone_config
        # last training targets per user the backbone never fit (stacking checks it against its own)
        self.backbone_holdout = int(backbone_config["holdout_last_targets"] or 0)  # ~ in checkpoints older than the key
        self.refit_backbone: nn.Module | None = None
        if config["refit_backbone_checkpoint"]:  # AlignLLMRec's backbone_refit_epochs (quick_start trains it)
            if not self.supports_backbone_refit:
                raise ValueError(f"{type(self).__name__} does not evaluate with a refit backbone; unset "
                                 "refit_backbone_checkpoint / backbone_refit_epochs (AlignLLMRec has them).")
            self.refit_backbone = self._load_refit_backbone(config["refit_backbone_checkpoint"], dataset, trust)
        self.fold_backbones: nn.ModuleList | None = None
        self.active_fold: int | None = None  # the fold whose samples a cross-fitted training step is scoring
        fold_paths = checkpoint_list(config["cross_fit_backbone_checkpoints"])
        folds = int(config["cross_fit_folds"] or 0)  # the one switch: the list must match it
        if fold_paths or folds:
            if len(fold_paths) != folds:
                raise ValueError(f"cross_fit_folds is {folds} but cross_fit_backbone_checkpoints lists {len(fold_paths)} "
                                 "backbones: give one per fold (run through run_recbole_llmalign to have them trained), or "
                                 "set cross_fit_folds to 0 and unset the list.")
            self.fold_backbones = self._load_fold_backbones(fold_paths, dataset, trust)
            self.register_buffer("user_fold", torch.from_numpy(user_folds(dataset, len(self.fold_backbones))), persistent=False)
        self.cross_fit_evaluation = str(config["cross_fit_evaluation"] or "full")
        if self.cross_fit_evaluation not in CROSS_FIT_EVALUATIONS:
            raise ValueError(f"cross_fit_evaluation must be one of {CROSS_FIT_EVALUATIONS}, got '{self.cross_fit_evaluation}'.")
        if self.cross_fit_evaluation == "folds" and self.fold_backbones is None:
            raise ValueError(f"cross_fit_evaluation: folds ranks valid/test with the cross-fitting fold backbones, and this "
                             f"{type(self).__name__} has none: set cross_fit_evaluation: full"
                             + (", or cross_fit_folds >= 2." if self.supports_cross_fitting else "."))
        self.lora = int(config["lora_r"]) > 0
        # whether LLM weights change in training (LoRA adapters, or every weight with llm_init: scratch)
        self.llm_trained = self.lora or str(config["llm_init"] or "pretrained") == "scratch"
        llm = load_causal_lm(config["llm_path"], cache_dir=config["llm_cache_dir"], dtype=config["llm_dtype"],
                             llm_layers=config["llm_layers"], lora_r=int(config["lora_r"]),
                             lora_alpha=int(config["lora_alpha"]), lora_target_modules=config["lora_target_modules"],
                             device=config["device"], init=str(config["llm_init"] or "pretrained"))
        self.llm, self.tokenizer, self.llm_source = llm.model, llm.tokenizer, llm.source
        self.llm_hidden_size, self.llm_num_layers = llm.hidden_size, llm.num_layers
        base = self.base_llm
        self.decoder, self.embed_tokens, self.lm_head = base.model, base.get_input_embeddings(), base.get_output_embeddings()
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id  # the loader sets it to eos when the tokenizer has none
        self.micro_batch = int(config["llm_micro_batch"])
        self.show_progress = bool(config["show_progress"])  # micro-batch bar in evaluation (micro_batch_starts)
        title_field = (config["item_text_fields"] or [None])[0]  # the dataset may have no text fields
        self.titles = item_texts(dataset, [title_field]) if title_field else [""] * dataset.item_num

    def _load_refit_backbone(self, checkpoint_path: str, dataset: Any, trust: bool) -> nn.Module:
        """The backbone evaluation reads: trained on every training target, the stacking holdout included,
        so it must have no holdout of its own and the fit backbone's sizes (its vectors feed the same projectors)."""
        if self.backbone_holdout == 0:
            raise ValueError("refit_backbone_checkpoint is set but backbone_checkpoint holds out no training targets, so "
                             "there is nothing to refit: use the refit with stacking (holdout_last_targets > 0) or unset it.")
        refit, refit_config = load_backbone(checkpoint_path, dataset, type(self).__name__, trust)
        if int(refit_config["holdout_last_targets"] or 0) > 0:
            raise ValueError(f"refit_backbone_checkpoint {checkpoint_path} was trained with holdout_last_targets="
                             f"{refit_config['holdout_last_targets']}; the refit backbone is the one that fits every training "
                             "target. Train it with holdout_last_targets=0 (leave the key empty to have it trained so).")
        if refit.hidden_size != self.fit_backbone.hidden_size or refit.item_representation != self.fit_backbone.item_representation:
            raise ValueError(f"refit_backbone_checkpoint {checkpoint_path} has hidden_size {refit.hidden_size} and "
                             f"{refit.item_representation} items, the backbone {self.fit_backbone.hidden_size} and "
                             f"{self.fit_backbone.item_representation}: refit a copy of the backbone (init_checkpoint).")
        return refit

    def _load_fold_backbones(self, paths: list[str], dataset: Any, trust: bool) -> nn.ModuleList:
        """The cross-fitting backbones: the i-th trained without the users of fold i of K (``exclude_user_fold``),
        every fold exactly once, on every target of the other users, with the evaluation backbone's sizes."""
        if not self.supports_cross_fitting:
            raise ValueError(f"{type(self).__name__} does not train with cross-fitting fold backbones; unset "
                             "cross_fit_backbone_checkpoints / cross_fit_folds (AlignLLMRec has them).")
        if self.refit_backbone is not None:
            raise ValueError("cross_fit_backbone_checkpoints and refit_backbone_checkpoint both set: cross-fitting evaluates "
                             "with backbone_checkpoint (trained on every user and target), so there is nothing to refit; "
                             "unset one of them (backbone_refit_epochs 0 with cross_fit_folds).")
        if self.backbone_holdout or parse_user_fold(self.fit_backbone_config["exclude_user_fold"]):
            raise ValueError(f"cross-fitting evaluates with backbone_checkpoint, which holds out {self.backbone_holdout} "
                             f"targets per user and leaves out user fold {self.fit_backbone_config['exclude_user_fold']}: "
                             "pass one trained on every user and target (holdout_last_targets 0, exclude_user_fold ~).")
        backbones = []
        for index, path in enumerate(paths):
            backbone, backbone_config = load_backbone(path, dataset, type(self).__name__, trust,
                                                      key=f"cross_fit_backbone_checkpoints[{index}]")
            fold = parse_user_fold(backbone_config["exclude_user_fold"])
            if fold != (index, len(paths)) or int(backbone_config["holdout_last_targets"] or 0):
                raise ValueError(f"cross_fit_backbone_checkpoints[{index}] ({path}) was trained with exclude_user_fold="
                                 f"{backbone_config['exclude_user_fold']} and holdout_last_targets="
                                 f"{backbone_config['holdout_last_targets']}; entry i of K must leave out fold i of K "
                                 f"(exclude_user_fold [{index}, {len(paths)}]) and hold out no targets.")
            if backbone.hidden_size != self.fit_backbone.hidden_size or \
                    backbone.item_representation != self.fit_backbone.item_representation:
                raise ValueError(f"cross_fit_backbone_checkpoints[{index}] ({path}) has hidden_size {backbone.hidden_size} and "
                                 f"{backbone.item_representation} items, backbone_checkpoint {self.fit_backbone.hidden_size} "
                                 f"and {self.fit_backbone.item_representation}: train the folds with the backbone's settings.")
            backbones.append(backbone)
        return nn.ModuleList(backbones)

    @property
    def backbone(self) -> nn.Module:
        """The frozen AlignSASRec the model reads now: in training the one that never fit the stacking
        samples (``fit_backbone``; under cross-fitting the fold backbone of ``active_fold``), in
        evaluation ``scoring_backbone``."""
        if not self.training and not self.routes_evaluation:
            return self.scoring_backbone
        if self.fold_backbones is None:
            return self.fit_backbone
        if self.active_fold is None:
            raise RuntimeError("cross-fitting: a training step (and, with cross_fit_evaluation: folds, an evaluation "
                               "step) must go through cross_fitted (fold_routed), which picks for each sample the fold "
                               "backbone that never saw its user.")
        return self.fold_backbones[self.active_fold]

    @property
    def routes_evaluation(self) -> bool:
        """Whether valid/test rank each user with the fold backbone that never saw them (cross_fit_evaluation: folds)."""
        return self.fold_backbones is not None and self.cross_fit_evaluation == "folds"

    def fold_routed(self, interaction: Any, score_of: Any) -> torch.Tensor:
        """``score_of(interaction)`` in evaluation, under ``cross_fit_evaluation: folds`` computed per fold of
        users with that fold's backbone (the one that never saw them), rows back in the input order."""
        if not self.routes_evaluation or self.training:
            return score_of(interaction)

        def score(fold: int, rows: Any) -> torch.Tensor:
            self.active_fold = fold
            return score_of(rows)

        try:
            return route_by_fold(interaction, folds_of(interaction, self.user_fold, self.USER_ID), score)
        finally:
            self.active_fold = None

    def cross_fitted(self, interaction: Any, loss_of: Any) -> Any:
        """``loss_of(interaction)``, or under cross-fitting the mean over the batch of it computed per fold of
        users, each fold's rows scored by the fold backbone that never saw them (weights: rows per fold).
        A loss may be a tensor or a tuple of tensors (RecBole sums a tuple's parts)."""
        if self.fold_backbones is None or not self.training:
            return loss_of(interaction)
        folds = self.user_fold[interaction[self.USER_ID]]
        total: Any = None
        try:
            for fold in folds.unique().tolist():
                rows = torch.nonzero(folds == fold).squeeze(1)
                self.active_fold = int(fold)
                part = loss_of(interaction[rows])
                weight = len(rows) / len(folds)
                parts = part if isinstance(part, tuple) else (part,)
                total = [p * weight for p in parts] if total is None else [t + p * weight for t, p in zip(total, parts)]
        finally:
            self.active_fold = None
        return tuple(total) if len(total) > 1 else total[0]

    @property
    def scoring_backbone(self) -> nn.Module:
        """The backbone valid/test rank with: the refit one (every training target fit) when there is
        one, the fold backbones routed by user under ``cross_fit_evaluation: folds``, else the fit backbone."""
        if self.routes_evaluation:
            return FoldRoutedBackbone(self.fold_backbones, self.user_fold, self.USER_ID)
        return self.refit_backbone if self.refit_backbone is not None else self.fit_backbone

    def micro_batch_starts(self, total: int, desc: str, step: int | None = None) -> Any:
        """First rows of the ``llm_micro_batch`` slices of ``total`` rows, under a progress bar when
        ``show_progress``: RecBole's evaluation bar counts whole eval batches (often one), while the
        LLM passes over the micro-batches are where evaluating these models spends its time."""
        from tqdm import tqdm

        return tqdm(range(0, total, step or self.micro_batch), desc=desc, unit="batch", leave=False, disable=not self.show_progress)

    def llm_autocast(self) -> ContextManager[object]:
        """The precision context of every LLM forward: autocast in the LLM's dtype when its weights
        are bf16/fp16 (float32 soft tokens and prefixes then meet them without a dtype error), a
        no-op for float32 weights. Heads and losses run outside it, on float32 inputs."""
        return llm_autocast(self.embed_tokens.weight)

    @property
    def base_llm(self) -> nn.Module:
        """The LLM under its LoRA wrapper (the wrapper itself when there is none)."""
        return self.llm.get_base_model() if self.lora else self.llm

    def train(self, mode: bool = True) -> FrozenBackboneLLMRecommender:
        super().train(mode)
        self.fit_backbone.eval()  # frozen: dropout off, item table cached
        if self.refit_backbone is not None:
            self.refit_backbone.eval()
        if self.fold_backbones is not None:
            self.fold_backbones.eval()
        self.llm.eval()  # frozen base: no dropout (LoRA dropout off too: adapters are small)
        return self

    def user_vectors(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """Backbone sequence vectors [B, C]; a user with an empty history gets the zero vector."""
        with torch.no_grad():
            user = self.backbone.forward(item_seq, item_seq_len.clamp(min=1))
        return user * (item_seq_len > 0).unsqueeze(-1)

    # ---- token batches ----
    def left_pad(self, rows: list[list[int]], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids [B, T] and attention mask [B, T]: the last position of every row is real.

        Built on the host from Python lists, then moved to ``device`` in one copy each (``None``: stay on the host).
        """
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=HOST)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=HOST)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row):] = torch.tensor(row, device=HOST)
                mask[i, width - len(row):] = 1
        return ids.to(device), mask.to(device)

    @staticmethod
    def positions(mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Position ids of left-padded rows [B, T]: 0 at each row's first real token, after ``offset`` prefix slots."""
        return (mask.cumsum(dim=1) - 1).clamp(min=0) + offset

    def save_peft_adapter(self, folder: str | Path) -> bool:
        """With LoRA, write the adapter in peft's own format (``adapter_config.json`` and
        ``adapter_model.safetensors``) into ``folder``, atomically, so ``PeftModel.from_pretrained``
        on the same base LLM (cut to the same ``llm_layers``) loads it. Returns False without LoRA."""
        if not self.lora:
            return False
        from recbole_llmalign.io import atomic_directory

        with atomic_directory(folder) as staging:
            self.llm.save_pretrained(staging)
        return True

    # ---- trainable-only checkpoints ----
    def kept_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad} | set(self.kept_buffers)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Only trainable parameters and ``kept_buffers``: the LLM and backbone are rebuilt from their own files."""
        keep = self.kept_names()
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if k in keep}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        missing, unexpected = self.kept_names() - set(state_dict), set(state_dict) - self.kept_names()
        if strict and (missing or unexpected):
            raise RuntimeError(f"{type(self).__name__} checkpoint does not match this config: missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}. Was it saved with other prefix/codebook/LoRA settings?")
        return super().load_state_dict(state_dict, strict=False, assign=assign)
