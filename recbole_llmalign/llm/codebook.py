"""Item tokenizer for AlignGenRec: cascaded residual codebooks aligned to the LLM's token space.

Each item vector (CF embedding joined with fused text) goes through an encoder MLP, then L
residual codebooks of K codes each (k-means initialised, commitment loss, dead codes restarted),
then a decoder that reconstructs the input. An alignment loss pulls the quantized latent,
projected to the LLM hidden size, towards the LLM's own embedding of the item's title, so items
the LLM reads alike get nearby codes (the two-stage alignment of "Semantic Convergence",
arXiv 2412.13771; residual quantisation as in TIGER).

Every item must end with a unique code sequence: colliding items inside a group that shares the
first L-1 codes get distinct last-level codes by a balanced (Hungarian) assignment, and only a
group larger than K needs one extra disambiguation level. :class:`CodeTrie` then answers "which
codes may follow this prefix" for constrained beam search, fully vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from recbole_llmalign.devices import HOST


class ResidualCodebook(nn.Module):
    """Encoder -> L residual codebooks -> decoder, with a projector into the LLM's hidden space."""

    def __init__(self, input_dim: int, latent_dim: int, levels: int, codes_per_level: int, llm_dim: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(input_dim, 2 * latent_dim), nn.ReLU(), nn.Linear(2 * latent_dim, latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 2 * latent_dim), nn.ReLU(), nn.Linear(2 * latent_dim, input_dim))
        self.codebooks = nn.Parameter(torch.zeros(levels, codes_per_level, latent_dim))
        self.llm_projector = nn.Linear(latent_dim, llm_dim)

    def quantize(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(codes [N, L], quantized latent [N, d], residual entering each level) by nearest codeword per level."""
        residual, quantized, codes, residuals = latent, torch.zeros_like(latent), [], []
        for level in range(self.codebooks.size(0)):
            residuals.append(residual)
            code = torch.cdist(residual, self.codebooks[level]).argmin(dim=1)
            chosen = self.codeword(level, code)
            quantized = quantized + chosen
            residual = residual - chosen
            codes.append(code)
        return torch.stack(codes, dim=1), quantized, residuals

    def codeword(self, level: int, code: torch.Tensor) -> torch.Tensor:
        """[N, d] codewords of ``code`` [N] at ``level``, as a one-hot product: its gradient is a
        matmul, the same on every run, where indexing's accumulates in thread order on CPUs (two
        runs of the same fit then ended with different codes)."""
        return F.one_hot(code, self.codebooks.size(1)).to(self.codebooks.dtype) @ self.codebooks[level]

    @torch.no_grad()
    def kmeans_init(self, latent: torch.Tensor, seed: int) -> None:
        """Level by level k-means on the residuals left by the levels above (TIGER's initialisation)."""
        from sklearn.cluster import KMeans

        residual = latent
        k = self.codebooks.size(1)
        for level in range(self.codebooks.size(0)):
            data = residual.cpu().numpy()
            n_clusters = min(k, len(np.unique(data.round(6), axis=0)))
            centers = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed + level).fit(data).cluster_centers_
            book = torch.as_tensor(centers, dtype=latent.dtype, device=latent.device)
            if n_clusters < k:  # fewer distinct points than codes: spare codes start near random points
                noise = 1e-3 * torch.randn(k - n_clusters, residual.size(1), dtype=residual.dtype, device=residual.device)
                extra = residual[torch.randint(len(residual), (k - n_clusters,), device=HOST)] + noise  # seeded CPU stream
                book = torch.cat([book, extra])
            self.codebooks[level] = book
            residual = residual - book[torch.cdist(residual, book).argmin(dim=1)]


@dataclass
class CodebookResult:
    """Unique item codes and the tokenizer report."""

    codes: torch.Tensor  # [N, L'] long; L' = L, or L + 1 when a disambiguation level was needed
    codes_per_level: list[int]  # K of each of the L' levels
    report: dict[str, Any] = field(default_factory=dict)


def fit_codebook(vectors: torch.Tensor, llm_targets: torch.Tensor | None, target_mask: torch.Tensor | None, *,
                 levels: int = 4, codes_per_level: int = 32, latent_dim: int = 32, steps: int = 300,
                 learning_rate: float = 1e-3, commitment_weight: float = 0.25, llm_align_weight: float = 0.1,
                 seed: int = 2020, show_progress: bool = True) -> CodebookResult:
    """Train the residual codebook on ``vectors`` [N, D] (full batch) and return unique codes.

    ``llm_targets`` [N, H] are the LLM's embeddings of each item's text; ``target_mask`` [N] marks
    the items that have text (the others are left out of the alignment loss).
    """
    if vectors.size(0) < 2:
        raise ValueError("The item tokenizer needs at least two items.")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    data = vectors.detach().float()
    data = (data - data.mean(0)) / (data.std(0) + 1e-6)  # one scale for CF and text dimensions
    llm_dim = llm_targets.size(1) if llm_targets is not None else 1
    tokenizer = ResidualCodebook(data.size(1), latent_dim, levels, codes_per_level, llm_dim)
    tokenizer.kmeans_init(tokenizer.encoder(data).detach(), seed)
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=learning_rate)
    use_align = llm_targets is not None and llm_align_weight > 0 and target_mask is not None and bool(target_mask.any())
    losses: dict[str, float] = {}
    for step in tqdm(range(steps), desc="item tokenizer", disable=not show_progress, leave=False):
        latent = tokenizer.encoder(data)
        codes, quantized, residuals = tokenizer.quantize(latent)
        chosen = [tokenizer.codeword(level, codes[:, level]) for level in range(levels)]
        commit = sum(F.mse_loss(r, chosen[level].detach()) for level, r in enumerate(residuals))
        book = sum(F.mse_loss(chosen[level], r.detach()) for level, r in enumerate(residuals))
        straight_through = latent + (quantized - latent).detach()
        reconstruction = F.mse_loss(tokenizer.decoder(straight_through), data)
        loss = reconstruction + book + commitment_weight * commit
        align = torch.zeros((), device=data.device)
        if use_align:
            projected = tokenizer.llm_projector(quantized)
            align = (1 - F.cosine_similarity(projected[target_mask], llm_targets[target_mask].float(), dim=-1)).mean()
            loss = loss + llm_align_weight * align
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 49 and step < steps - 50:  # restart dead codes on residuals of random items
            with torch.no_grad():
                for level in range(levels):
                    dead = torch.ones(codes_per_level, dtype=torch.bool, device=codes.device)
                    dead[codes[:, level].unique()] = False
                    if dead.any():
                        picks = torch.randint(len(data), (int(dead.sum()),), device=HOST)  # seeded CPU stream
                        tokenizer.codebooks[level][dead] = residuals[level][picks].detach()
        losses = {"reconstruction": float(reconstruction.detach()), "commitment": float(commit.detach()),
                  "llm_align": float(align.detach())}
    with torch.no_grad():
        latent = tokenizer.encoder(data)
        codes, quantized, residuals = tokenizer.quantize(latent)
        reconstruction = float(F.mse_loss(tokenizer.decoder(quantized), data))
    torch.random.set_rng_state(generator_state)
    report = {"items": int(len(codes)), "levels": levels, "codes_per_level": codes_per_level,
              "reconstruction_mse": reconstruction, **{f"final_{k}_loss": v for k, v in losses.items()}}
    for level in range(levels):
        counts = torch.bincount(codes[:, level], minlength=codes_per_level).float()
        probs = counts[counts > 0] / counts.sum()
        report[f"level{level}_usage"] = float((counts > 0).float().mean())
        report[f"level{level}_perplexity"] = float(torch.exp(-(probs * probs.log()).sum()))
    report["collision_rate_before"] = collision_rate(codes)
    unique, per_level, moved = resolve_collisions(codes, residuals[-1], tokenizer.codebooks[-1].detach())
    report.update(collision_rate_after=collision_rate(unique), reassigned_items=moved,
                  disambiguation_level=len(per_level) > levels)
    return CodebookResult(codes=unique, codes_per_level=[codes_per_level] * levels + per_level[levels:], report=report)


def collision_rate(codes: torch.Tensor) -> float:
    """Share of items whose full code sequence is also another item's."""
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).float().mean())


def resolve_collisions(codes: torch.Tensor, last_residual: torch.Tensor,
                       last_codebook: torch.Tensor) -> tuple[torch.Tensor, list[int], int]:
    """Make every row of ``codes`` unique; returns (codes, codes per level, items moved).

    Inside each group of colliding items that share the first L-1 codes, items get distinct
    last-level codes by a minimum-distance assignment (balanced: each code used once). A group
    larger than K is assigned in chunks of K, and only then one extra level numbers the chunks
    (ceil(group / K) codes), so the extra level stays as small as possible.
    """
    from scipy.optimize import linear_sum_assignment

    codes = codes.clone()
    levels, k = codes.size(1), last_codebook.size(0)
    moved = 0
    chunk = torch.zeros(len(codes), dtype=codes.dtype, device=codes.device)
    if collision_rate(codes) > 0:
        if levels == 1:
            group = torch.zeros(len(codes), dtype=torch.long, device=codes.device)
        else:
            _, group = torch.unique(codes[:, :-1], dim=0, return_inverse=True)
        distances = torch.cdist(last_residual, last_codebook)
        for g in torch.unique(group).tolist():
            members = (group == g).nonzero().flatten()
            if len(members) < 2 or len(codes[members, -1].unique()) == len(members):
                continue
            for index, start in enumerate(range(0, len(members), k)):
                take = members[start:start + k]
                rows, cols = linear_sum_assignment(distances[take].cpu().numpy())
                new = torch.as_tensor(cols, dtype=codes.dtype, device=codes.device)
                moved += int((codes[take[rows], -1] != new).sum())
                codes[take[rows], -1] = new
                chunk[take] = index
    per_level = [k] * levels
    if int(chunk.max()) > 0:  # a group larger than K: its chunks are told apart on one extra level
        codes = torch.cat([codes, chunk.unsqueeze(1)], dim=1)
        per_level.append(int(chunk.max()) + 1)
    if collision_rate(codes) > 0:
        raise RuntimeError("Item codes still collide after resolution; this is a bug, please report it.")
    return codes, per_level, moved


class CodeTrie:
    """Prefix trie of valid item codes, answered with sorted integer keys (no Python loops per beam).

    A prefix (c_0..c_{l-1}) is the integer sum c_j * base^j; ``allowed(prefixes)`` returns a
    [M, K_l] mask of the codes that continue a real item, ``items(full_codes)`` the item index of
    each full code (-1 when none).
    """

    def __init__(self, codes: torch.Tensor, item_ids: torch.Tensor, codes_per_level: list[int]) -> None:
        if len(torch.unique(codes, dim=0)) != len(codes):
            raise ValueError("Item codes are not unique; resolve collisions before building the trie.")
        self.levels = codes.size(1)
        self.codes_per_level = list(codes_per_level)
        self.base = max(codes_per_level)
        if self.levels * np.log2(max(self.base, 2)) >= 62:
            raise ValueError(f"{self.levels} levels of up to {self.base} codes do not fit 64-bit trie keys; use fewer or smaller levels.")
        self.powers = self.base ** torch.arange(self.levels, dtype=torch.long)
        self.level_keys: list[torch.Tensor] = []
        self.level_masks: list[torch.Tensor] = []
        for level in range(self.levels):
            keys = (codes[:, :level] * self.powers[:level]).sum(1)
            unique_keys, inverse = torch.unique(keys, return_inverse=True)
            mask = torch.zeros(len(unique_keys), codes_per_level[level], dtype=torch.bool)
            mask[inverse, codes[:, level]] = True
            self.level_keys.append(unique_keys)
            self.level_masks.append(mask)
        full = (codes * self.powers).sum(1)
        order = full.argsort()
        self.full_keys, self.full_items = full[order], item_ids[order]

    def _lookup(self, sorted_keys: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        position = torch.searchsorted(sorted_keys, keys).clamp(max=len(sorted_keys) - 1)
        return position, sorted_keys[position] == keys

    def allowed(self, prefixes: torch.Tensor) -> torch.Tensor:
        """[M, K_l] bool: codes allowed after each prefix [M, l] (all False for an invalid prefix)."""
        level = prefixes.size(1)
        keys = (prefixes.cpu() * self.powers[:level]).sum(1)
        position, found = self._lookup(self.level_keys[level], keys)
        return self.level_masks[level][position] & found.unsqueeze(1)

    def items(self, full_codes: torch.Tensor) -> torch.Tensor:
        """Item index of each full code [M, L'] (-1 where the code is not an item's)."""
        keys = (full_codes.cpu() * self.powers).sum(1)
        position, found = self._lookup(self.full_keys, keys)
        return torch.where(found, self.full_items[position], torch.full_like(keys, -1))


def code_rows_at_title_centroids(embeddings: torch.Tensor, item_codes: torch.Tensor, codes_per_level: list[int],
                                 title_rows: torch.Tensor, has_title: torch.Tensor) -> torch.Tensor:
    """Initial input rows of the code tokens [total codes, H]: each code at the mean LLM title embedding
    (``title_rows`` [N, H]) of the items that carry it (``item_codes`` [N, L]); codes no titled item
    carries start near the centre of the LLM's ``embeddings`` [V, H] (seeded noise)."""
    mean, std = embeddings.mean(0), embeddings.std(0)
    generator = torch.Generator(device=HOST).manual_seed(0)
    noise = torch.randn(sum(codes_per_level), embeddings.size(1), generator=generator, device=HOST)
    rows = mean + 0.5 * std * noise.to(embeddings.device)
    titled = has_title.clone()
    titled[0] = False  # the padding item
    offset = 0
    for level, size in enumerate(codes_per_level):
        codes = item_codes[titled, level]
        if len(codes) > 0:
            sums = torch.zeros(size, embeddings.size(1), device=title_rows.device).index_add_(0, codes, title_rows[titled])
            counts = torch.bincount(codes, minlength=size).unsqueeze(1)
            used = counts.squeeze(1) > 0
            rows[offset:offset + size][used] = sums[used] / counts[used]
        offset += size
    return rows


def legacy_level_sizes(codes: torch.Tensor, total_codes: int, codebook_size: int) -> torch.Tensor:
    """Codes per level of a checkpoint that did not store them: every level has ``codebook_size``
    codes, except an extra disambiguation level, which has the rest of the code-embedding rows."""
    levels = codes.size(1)
    regular = min(levels, total_codes // codebook_size)
    sizes = [codebook_size] * regular + ([total_codes - regular * codebook_size] if levels > regular else [])
    return torch.tensor(sizes, dtype=torch.long, device=codes.device)
