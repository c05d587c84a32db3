"""Averaging LoRAs exactly, in weight-delta space (and compressing the average by SVD).

A LoRA changes a weight by dW = c * B @ A, with c = alpha / r. The average of N LoRAs
(weights w_i, 1/N each by default; any real numbers, negative ones included) is

    mean_i  w_i * c_i * B_i @ A_i  =  [w_1 c_1 B_1 | ... | w_N c_N B_N] @ [A_1; ...; A_N]
                                         (out, sum r_i)                    (sum r_i, in)

so the exact average is itself a LoRA of rank sum(r_i): concatenate along the rank, fold each
member's weight and scale into its B, alpha = rank so the file's own scale is 1. Members may
have different ranks. `exact_average` does this.

That rank grows with N. `compress` (and `svd_average`) brings it back down: the best rank-k
approximation of a matrix in the Frobenius norm is its truncated SVD (Eckart-Young),

    dW = U diag(S) Vh   ->   dW_k = U[:, :k] diag(S[:k]) Vh[:k]      error^2 = sum_{j>k} S_j^2

and the *energy kept* is sum_{j<=k} S_j^2 / sum_j S_j^2 = ||dW_k||^2 / ||dW||^2. With
rank="auto" each layer keeps the fewest directions that reach a target energy, so layers get
different ranks (written with peft's rank_pattern / alpha_pattern).

Averaging A and B separately is NOT the average: the product of averages is not the average of
products,

    mean(B) @ mean(A) = (1/N^2) sum_i sum_j B_i @ A_j        (cross terms B_i A_j, i != j)

`naive_average` computes it anyway, for teaching, and `naive_error` measures how far it is.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import warnings

import torch

from .lora import PREFIX, LoraFile, LoraMismatchError, module_deltas, unit_scale_config

# ---------------------------------------------------------------------------------- checks


def check_members(loras: list[LoraFile], weights: list[float] | None = None) -> list[float]:
    """The members' weights (1/N each by default), after checking that the LoRAs can be averaged:
    the same modules, with the same weight shapes (out, in[, kh, kw]), i.e. one base and one set of targets."""
    if not loras:
        raise ValueError("nothing to average: give at least one LoRA")
    weights = [1.0 / len(loras)] * len(loras) if weights is None else [float(w) for w in weights]
    if len(weights) != len(loras):
        raise ValueError(f"{len(weights)} weights for {len(loras)} LoRAs: give one weight per LoRA")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    first = loras[0].modules()
    for i, other in enumerate(loras[1:], 2):
        mods = other.modules()
        if set(mods) != set(first):
            diff = sorted(set(mods) ^ set(first))
            raise LoraMismatchError(f"LoRA {i} adapts other modules than LoRA 1 (e.g. {diff[:3]}); "
                                    "average LoRAs of one base and one set of targets")
        for name, (A, B) in mods.items():
            A1, B1 = first[name]
            if (B.shape[0], *A.shape[1:]) != (B1.shape[0], *A1.shape[1:]):
                raise LoraMismatchError(f"LoRA {i} and LoRA 1 differ in shape at {name}: "
                                        f"{(B.shape[0], *A.shape[1:])} vs {(B1.shape[0], *A1.shape[1:])}; "
                                        "average LoRAs of one base")
    bases = {l.meta.get("base_digest") for l in loras} - {None, ""}
    if len(bases) > 1:
        warnings.warn(f"the LoRAs were trained on {len(bases)} different bases (base_digest differs): "
                      "their average mixes weight changes of different models")
    return weights


def module_ranks(lora: LoraFile) -> dict[str, int]:
    """{module name: its rank} (the first dimension of A)."""
    return {name: int(A.shape[0]) for name, (A, _) in lora.modules().items()}


def rank_config(config: dict, ranks: dict[str, int]) -> dict:
    """A peft config for a LoRA whose scale alpha/r is 1 in every module, with per-module ranks
    (lora.unit_scale_config: the form every file the kit writes is in)."""
    return unit_scale_config(config, ranks)


def _tensors(name: str, A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{PREFIX}.{name}.lora_A.weight": A.contiguous(), f"{PREFIX}.{name}.lora_B.weight": B.contiguous()}


def _member_meta(loras: list[LoraFile], weights: list[float], method: str) -> dict:
    digests = {l.meta.get("base_digest", "") for l in loras}
    return {"stage": "average", "method": method, "members": ",".join(l.digest() for l in loras),
            "weights": ",".join(f"{w:g}" for w in weights), "base": loras[0].meta.get("base", ""),
            "family": loras[0].meta.get("family", ""),
            "base_digest": digests.pop() if len(digests) == 1 else "",
            **({"denoiser": loras[0].meta["denoiser"]} if "denoiser" in loras[0].meta else {})}


# ------------------------------------------------------------------------------ exact average


def exact_average(loras: list[LoraFile], weights: list[float] | None = None) -> LoraFile:
    """One LoRA whose delta-W is sum_i w_i * c_i * B_i @ A_i (w_i = 1/N by default): exact, rank sum(r_i)."""
    weights = check_members(loras, weights)
    tensors, ranks = {}, {}
    for name in loras[0].modules():
        As, Bs = [], []
        for w, l in zip(weights, loras):
            A, B = l.modules()[name]
            As.append(A.float())  # (r_i, in[, kh, kw])
            Bs.append(B.float() * (w * l.scaling(name)))  # (out, r_i[, 1, 1])  weight and scale folded into B
        tensors.update(_tensors(name, torch.cat(As, 0), torch.cat(Bs, 1)))  # (sum r, in..), (out, sum r, ..)
        ranks[name] = sum(A.shape[0] for A in As)
    meta = {**_member_meta(loras, weights, "exact"), "rank": max(ranks.values())}
    return LoraFile(tensors, rank_config(loras[0].config, ranks), meta)


# ---------------------------------------------------------------------------- SVD compression


def low_rank_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of M = B @ A without forming M: (U, S, Vh) with M = U diag(S) Vh.

    B: (out, R), A: (R, n). With QR factorizations B = Qb Rb and A^T = Qa Ra,
    M = Qb (Rb Ra^T) Qa^T: only the small core Rb Ra^T (at most R x R) needs an SVD, so a
    layer of rank R = sum r_i costs O((out + n) R^2), not an SVD of the whole (out, n) matrix.
    Returns U: (out, k), S: (k,), Vh: (k, n) with k = min(out, n, R), in float64.
    """
    Qb, Rb = torch.linalg.qr(B.double())  # (out, p), (p, R)    p = min(out, R)
    Qa, Ra = torch.linalg.qr(A.double().T)  # (n, q), (q, R)     q = min(n, R)
    Uc, S, Vhc = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # (p, k), (k,), (k, q)
    return Qb @ Uc, S, Vhc @ Qa.T  # (out, k), (k,), (k, n)


def choose_rank(S: torch.Tensor, rank: int | str, energy: float = 0.99) -> int:
    """How many singular values to keep: min(rank, len(S)), or with rank="auto" the fewest whose
    squares reach `energy` of the total sum of squares (at least 1; 1 for an all-zero layer)."""
    if rank != "auto":
        return max(1, min(int(rank), len(S)))
    power = S.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(power, 0) / total  # fraction kept by the first 1, 2, ... directions
    reached = torch.nonzero(cum >= energy * (1 - 1e-12)).flatten()  # (1e-12: energy=1.0 despite rounding)
    return int(reached[0]) + 1 if len(reached) else len(S)


@dataclasses.dataclass(frozen=True)
class LayerEnergy:
    """One layer's truncation: `rank` directions kept, `kept` = sum of their S^2, `total` = ||dW||_F^2."""

    rank: int
    kept: float
    total: float

    @property
    def fraction(self) -> float:
        return self.kept / self.total if self.total > 0 else 1.0


@dataclasses.dataclass
class SvdReport:
    """Per-layer ranks and energies of a truncated SVD; `energy` pools all layers: sum kept / sum total."""

    layers: dict[str, LayerEnergy]
    rank: int | str
    target: float | None

    @property
    def energy(self) -> float:
        total = sum(e.total for e in self.layers.values())
        return sum(e.kept for e in self.layers.values()) / total if total > 0 else 1.0

    @property
    def ranks(self) -> dict[str, int]:
        return {n: e.rank for n, e in self.layers.items()}


def truncate(B: torch.Tensor, A: torch.Tensor, rank: int | str, energy: float = 0.99
             ) -> tuple[torch.Tensor, torch.Tensor, LayerEnergy]:
    """Best rank-k LoRA (scale 1) of the update B @ A, B: (out, R[, 1, 1]), A: (R, in[, kh, kw]).

    The SVD is taken of the (out, in*kh*kw) matrix; the singular values are split evenly,
    B_k = U_k sqrt(S_k), A_k = sqrt(S_k) Vh_k, so that B_k @ A_k = U_k S_k Vh_k.
    Returns B_k: (out, k[, 1, 1]), A_k: (k, in[, kh, kw]), and the energy kept.
    """
    U, S, Vh = low_rank_svd(B.flatten(1), A.flatten(1))  # (out, m), (m,), (m, in*kh*kw)
    k = choose_rank(S, rank, energy)
    if len(S) < k:  # only when a layer has no direction at all (a 0-sized weight): pad with zeros
        U, S, Vh = (torch.nn.functional.pad(U, (0, k - len(S))), torch.nn.functional.pad(S, (0, k - len(S))),
                    torch.nn.functional.pad(Vh, (0, 0, 0, k - len(S))))
    root = S[:k].sqrt()
    B_k = (U[:, :k] * root).float().view(B.shape[0], k, *B.shape[2:])  # (out, k[, 1, 1])
    A_k = (root[:, None] * Vh[:k]).float().view(k, *A.shape[1:])  # (k, in[, kh, kw])
    power = S.double() ** 2
    return B_k, A_k, LayerEnergy(k, float(power[:k].sum()), float(power.sum()))


def _check_rank(rank: int | str, energy: float) -> None:
    if rank != "auto" and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer or 'auto', got {rank!r}")
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")


def compress(lora: LoraFile, rank: int | str = "auto", energy: float = 0.99) -> tuple[LoraFile, SvdReport]:
    """Truncated SVD of every layer's delta-W (alpha/r folded in): rank `rank` (capped at what the
    layer has), or rank="auto": per layer, the fewest directions that keep `energy` of ||dW||^2."""
    _check_rank(rank, energy)
    tensors, layers = {}, {}
    for name, (A, B) in lora.modules().items():
        B_k, A_k, layers[name] = truncate(B.float() * lora.scaling(name), A.float(), rank, energy)
        tensors.update(_tensors(name, A_k, B_k))
    report = SvdReport(layers, rank, energy if rank == "auto" else None)
    ranks = report.ranks
    meta = {"stage": "average", **lora.meta, "method": "svd", "rank": rank,
            "rank_min": min(ranks.values()), "rank_max": max(ranks.values()),
            "energy_target": energy if rank == "auto" else "", "energy_kept": f"{report.energy:.6f}"}
    meta.setdefault("members", lora.digest())
    return LoraFile(tensors, rank_config(lora.config, ranks), meta), report


def svd_average(loras: list[LoraFile], weights: list[float] | None = None, rank: int | str = "auto",
                energy: float = 0.99) -> tuple[LoraFile, SvdReport]:
    """The exact average, compressed by a truncated SVD per layer (see `compress`)."""
    _check_rank(rank, energy)
    return compress(exact_average(loras, weights), rank, energy)


# ------------------------------------------------------------------- the wrong way (teaching)


def naive_average(loras: list[LoraFile], weights: list[float] | None = None) -> LoraFile:
    """Average A and B separately (NOT the average; never the default): A = mean_i A_i,
    B = sum_i w_i c_i B_i (= mean of the scaled B_i with the default weights 1/N); scale 1.

    Needs equal ranks. Its delta-W, (sum_i w_i c_i B_i)(mean_j A_j), holds the cross terms
    B_i A_j (i != j) that the exact average does not have; for copies of one LoRA it is exact."""
    weights = check_members(loras, weights)
    ranks = module_ranks(loras[0])
    for i, l in enumerate(loras[1:], 2):
        if module_ranks(l) != ranks:
            raise LoraMismatchError(f"averaging A and B separately needs equal ranks: LoRA {i} has rank "
                                    f"{l.rank}, LoRA 1 rank {loras[0].rank} (the exact average has no such limit)")
    tensors = {}
    for name in ranks:
        A = torch.stack([l.modules()[name][0].float() for l in loras]).mean(0)  # (r, in[, kh, kw])
        B = sum(w * l.scaling(name) * l.modules()[name][1].float() for w, l in zip(weights, loras))  # (out, r[, 1, 1])
        tensors.update(_tensors(name, A, B))
    return LoraFile(tensors, rank_config(loras[0].config, ranks), _member_meta(loras, weights, "naive"))


@dataclasses.dataclass
class DeltaError:
    """||dW_approx - dW_exact||_F / ||dW_exact||_F per layer, and pooled over all layers
    (sqrt of the summed squared differences over sqrt of the summed squared norms)."""

    layers: dict[str, float]
    pooled: float


def relative_error(approx: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> DeltaError:
    """Relative Frobenius error of one set of per-module deltas against another (a zero exact layer: its absolute error)."""
    layers, diff2, norm2 = {}, 0.0, 0.0
    for name, d in exact.items():
        diff = float((approx[name].double() - d.double()).norm())
        norm = float(d.double().norm())
        layers[name] = diff / norm if norm > 0 else diff
        diff2, norm2 = diff2 + diff**2, norm2 + norm**2
    return DeltaError(layers, math.sqrt(diff2 / norm2) if norm2 > 0 else math.sqrt(diff2))


def delta_distance(a: LoraFile, b: LoraFile) -> float:
    """How far LoRA a's weight change is from LoRA b's: ||dW_a - dW_b||_F / ||dW_b||_F pooled over all
    layers (`relative_error(module_deltas(a), module_deltas(b)).pooled`; b is the reference; 0 for equal deltas)."""
    if set(a.modules()) != set(b.modules()):
        diff = sorted(set(a.modules()) ^ set(b.modules()))
        raise LoraMismatchError(f"the two LoRAs adapt different modules (e.g. {diff[:3]}): no delta-W distance")
    return relative_error(module_deltas(a), module_deltas(b)).pooled


def naive_error(loras: list[LoraFile], weights: list[float] | None = None) -> DeltaError:
    """How far averaging A and B separately lands from the exact average, in delta-W."""
    return relative_error(module_deltas(naive_average(loras, weights)), module_deltas(exact_average(loras, weights)))


# ------------------------------------------------------------------------- one call, one report


@dataclasses.dataclass
class AverageResult:
    lora: LoraFile
    method: str  # "exact" | "svd"
    weights: list[float]
    svd: SvdReport | None = None
    naive: DeltaError | None = None


def average(loras: list[LoraFile], weights: list[float] | None = None, rank: int | str | None = None,
            energy: float = 0.99, compare_naive: bool = False) -> AverageResult:
    """The exact average (rank=None), or its truncated SVD (rank=k or "auto" with `energy`);
    with compare_naive, also the error of averaging A and B separately (needs equal ranks)."""
    weights = check_members(loras, weights)
    if rank is not None:
        _check_rank(rank, energy)
    exact = exact_average(loras, weights)
    naive = relative_error(module_deltas(naive_average(loras, weights)), module_deltas(exact)) if compare_naive else None
    if rank is None:
        return AverageResult(exact, "exact", weights, None, naive)
    compressed, report = compress(exact, rank, energy)
    return AverageResult(compressed, "svd", weights, report, naive)


def format_report(result: AverageResult) -> str:
    """A few lines for the terminal: members, rank, energy kept, naive error."""
    ranks = module_ranks(result.lora)
    lines = [f"averaged {len(result.weights)} LoRAs, weights {','.join(f'{w:g}' for w in result.weights)}, "
             f"method {result.method}, {len(ranks)} layers"]
    if result.svd is None:
        lines.append(f"rank {max(ranks.values())} (sum of the members' ranks: exact)")
    else:
        rep = result.svd
        how = f"auto (energy >= {rep.target:g} per layer)" if rep.rank == "auto" else str(rep.rank)
        lines.append(f"rank {how}: per layer {min(ranks.values())}-{max(ranks.values())}, "
                     f"mean {statistics.mean(ranks.values()):.1f}")
        fr = {n: e.fraction for n, e in rep.layers.items()}
        worst = min(fr, key=fr.get)
        lines.append(f"energy kept: {100 * rep.energy:.2f}% in total; per layer min {100 * fr[worst]:.2f}% ({worst}), "
                     f"median {100 * statistics.median(fr.values()):.2f}%")
    if result.naive is not None:
        errs = result.naive.layers
        lines.append(f"naive average (A and B averaged separately): relative delta-W error {result.naive.pooled:.3g} "
                     f"pooled, per layer {min(errs.values()):.3g}-{max(errs.values()):.3g} (the exact average: 0)")
    return "\n".join(lines)
