"""`difflora inspect LORA [--base BASE]`: what a LoRA file is, and whether it will do anything.

    the file:     format (lora_formats), the family it was made for, rank and scale per module,
                  non-finite values, the kit's metadata (stage, health verdict, images' digests)
    against BASE: how many of its modules the kit applies (lora_match: which do not and why), and
                  what each known loader would apply, at which strength (loader_rules)
    one verdict line; exit 0 when it applies whole (or, without --base, when it is a readable
                  LoRA with finite values), 1 when nothing or only part of it would apply.

Reads the file and the base's config (module names and shapes on the meta device): no weights.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import torch

from . import backends, diffsynth, kohya, loader_rules, lora, lora_formats, lora_match
from .files import check_lora_path

KIT_FIELDS = ("stage", "family", "base", "health_verdict", "image_digest", "image1_digest", "preset_digest",
              "rank", "alpha", "imported_from", "kit_version")
WIDTH_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # a UNet LoRA's cross-attention width (attn2.to_k in)
DIFFSYNTH_LABELS = {"FLUX": lora_match.FLUX_DIT, "Z-Image": lora_match.ZIMAGE_DIT, "UNet (SD 1.x / SDXL)": lora_match.UNET}


@dataclasses.dataclass
class FileFacts:
    """What the file itself says (no base needed)."""

    path: Path
    size: int
    tensors: dict[str, torch.Tensor]
    keys: dict[str, tuple[int, ...]]
    header: dict[str, str]
    scalars: dict[str, float]
    format: lora_formats.Format
    family: str
    """for people: "SDXL (a UNet: cross-attention 2048 wide)", "FLUX", "unknown" ..."""
    modules: dict[str, loader_rules.FileModule]
    non_finite: list[str]
    kit_meta: dict[str, str]


def cross_attention_width(keys: dict[str, tuple[int, ...]]) -> int | None:
    """The input width of a UNet LoRA's attn2.to_k (its text encoder's width), in any key style."""
    for key, shape in keys.items():
        if ("attn2.to_k.lora_A" in key or "attn2_to_k.lora_down" in key) and len(shape) >= 2:
            return int(shape[1])
    return None


def file_family(fmt: lora_formats.Format, keys: dict[str, tuple[int, ...]], header: dict[str, str]) -> str:
    """The family a LoRA was made for, read from its keys (the kit's record and kohya's
    ss_base_model_version shown beside): "SDXL (UNet names, cross-attention 2048 wide)", "FLUX", ..."""
    names = [k.rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k]
    if fmt.key == "diffsynth":
        kind = DIFFSYNTH_LABELS.get(diffsynth.label(names))
    elif fmt.key in ("kohya", "kohya-ldm"):
        kind = lora_match.FLUX_DIT if any("double_blocks" in k or "single_blocks" in k for k in keys) else lora_match.UNET
    else:
        bare = [n.split(".", 1)[1] if n.startswith((*lora_formats.DIFFUSERS_PREFIXES, "diffusion_model.")) else
                n.removeprefix("base_model.model.") for n in names]
        kind = lora_match.architecture_of(bare) or (lora_match.FLUX_DIT if kohya.is_flux(bare) else None)
    if kind == lora_match.UNET:
        width = cross_attention_width(keys)
        text = WIDTH_FAMILIES.get(width, "a UNet") + (f" (UNet names, cross-attention {width} wide)" if width else "")
    else:
        text = {lora_match.FLUX_DIT: "FLUX", lora_match.ZIMAGE_DIT: "Z-Image"}.get(
            kind, "unknown (module names of no family the kit knows)")
    said = [f"the kit recorded {header['difflora.family']}"] if header.get("difflora.family") else []
    said += [f"kohya's ss_base_model_version {header['ss_base_model_version']}"] if header.get("ss_base_model_version") else []
    return text + (f" [{'; '.join(said)}]" if said else "")


def read_facts(path: Path) -> FileFacts:
    """Everything `inspect` says about the file alone."""
    path = check_lora_path(path)
    tensors, header = lora.read_file(path)
    keys = {k: tuple(t.shape) for k, t in tensors.items()}
    scalars = {k: float(t.reshape(-1)[0]) for k, t in tensors.items() if t.numel() == 1}
    fmt = lora_formats.detect(keys, header)
    non_finite = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    kit_meta = {k[len("difflora."):]: v for k, v in header.items() if k.startswith("difflora.")}
    return FileFacts(path, path.stat().st_size, tensors, keys, header, scalars, fmt, file_family(fmt, keys, header),
                     loader_rules.file_modules(keys, header, scalars), non_finite, kit_meta)


def counted(values) -> str:
    """"8 (all 204)" or "8 (180), 4 (24)": a value per module, most common first."""
    counts = collections.Counter(values)
    if len(counts) == 1:
        value, n = counts.most_common(1)[0]
        return f"{value:g} (all {n})"
    return ", ".join(f"{v:g} ({n})" for v, n in counts.most_common(4)) + (" ..." if len(counts) > 4 else "")


def facts_lines(facts: FileFacts) -> list[str]:
    mods = facts.modules.values()
    lines = [f"{facts.path}: {facts.size / 2**20:.2f} MiB, {len(facts.keys)} tensors",
             f"  format   {facts.format.label}" + (f", prefix {facts.format.prefix!r}" if facts.format.prefix else ""),
             f"  family   {facts.family}"]
    if mods:
        scales = [round(m.scale, 4) for m in mods]
        lines.append(f"  modules  {len(facts.modules)}; rank {counted(m.rank for m in mods)}; scale alpha/r {counted(scales)}")
        if any(s != 1 for s in scales):
            lines.append("           the scale is in the header or .alpha tensors, not in the weights: loaders that "
                         "ignore it read 1 (see the loaders below)")
    else:
        lines.append("  modules  none: no LoRA A/B (or lora_down/lora_up) pairs in this file")
    lines.append(f"  values   {'all finite' if not facts.non_finite else f'NaN or infinite in {len(facts.non_finite)} tensors, e.g. ' + ', '.join(facts.non_finite[:2])}")
    meta = [f"{k}={facts.kit_meta[k]}" for k in KIT_FIELDS if facts.kit_meta.get(k)]
    if meta:
        lines.append("  kit      " + ", ".join(meta))
    return lines


@dataclasses.dataclass
class Against:
    """The file on one base."""

    base_label: str
    kit: lora_match.Match | None
    kit_error: str
    """why the kit cannot read the file for this base at all ("" when it can)"""
    readings: list[loader_rules.Reading]


def against_base(facts: FileFacts, base) -> Against:
    resolved = backends.resolve_base(base, configs_only=True)
    names, shapes = backends.module_names(resolved), backends.weight_shapes(resolved)
    try:
        the_lora = lora.from_tensors(facts.tensors, facts.header, module_names=lambda: names)
        found, error = lora_match.match(lora.lora_shapes(the_lora), shapes), ""
    except (lora.LoraMismatchError, ValueError) as e:
        found, error = None, str(e)
    family = resolved.family.key
    readings = loader_rules.readings(facts.keys, facts.header, family, names, facts.scalars) \
        if family in loader_rules.PREFIX else []
    return Against(f"{resolved.family.label} at {resolved.folder}", found, error, readings)


def against_lines(against: Against, base) -> list[str]:
    lines = [f"against {base} ({against.base_label}):"]
    if against.kit is not None:
        lines.append(f"  the kit  {against.kit.summary()}" + (f": e.g. {against.kit.examples()}" if against.kit.left_out else ""))
        if against.kit.why:
            lines.append(f"           why: {against.kit.why}")
    else:
        lines.append(f"  the kit  cannot use it: {against.kit_error}")
    if against.readings:
        lines.append("  loaders (modeled from each one's published source; applied / in the file, strength):")
        width = max(len(r.loader) for r in against.readings)
        for r in against.readings:
            why = "; ".join(x for x in (r.why, r.note) if x)
            lines.append(f"    {r.loader:<{width}}  {r.applied:>4}/{r.total:<4} {r.strength:<5}" + (f"  {why}" if why else ""))
    return lines


def verdict(facts: FileFacts, against: Against | None) -> tuple[str, int]:
    """(the verdict line, the exit code)."""
    if facts.non_finite:
        return ("BROKEN: it holds NaN or infinite values (a training run that diverged): applied, it turns every "
                "output into NaN. Retrain it (lower --lr or --alpha)"), 1
    if not facts.modules:
        return f"NOT A LORA the kit knows: {facts.format.label}", 1
    if against is None:
        return (f"a {facts.format.label} LoRA for {facts.family.split(' [')[0]}, {len(facts.modules)} modules. "
                "Give --base to check that it applies to a model"), 0
    complete = [r.loader for r in against.readings if r.complete]
    where = f" Complete in: {', '.join(complete)}." if complete else ""
    if against.kit is None or not against.kit.matched:
        why = against.kit.why if against.kit is not None else against.kit_error
        return f"NOTHING WOULD APPLY in the kit: {why}.{where}", 1
    if against.kit.left_out:
        return (f"ONLY PART WOULD APPLY: {against.kit.summary()}; in part a LoRA does part of its job, silently "
                f"(the kit refuses it). {against.kit.why}.{where}"), 1
    return f"OK: all {against.kit.total} modules apply in the kit.{where}", 0


def run(path, base=None) -> int:
    """Print what the file is (and does on `base`); the exit code (0 applies whole, 1 nothing or part)."""
    facts = read_facts(Path(path))
    print("\n".join(facts_lines(facts)))
    against = None
    if base is not None and facts.modules:
        against = against_base(facts, base)
        print("\n".join(against_lines(against, base)))
    line, code = verdict(facts, against)
    print(f"verdict: {line}")
    return code
