"""Which of the kit's LoRA file forms loads completely and at the right strength in which tool.

    python bench/loader_matrix.py

For SD 1.5, SDXL, FLUX.1 and Z-Image (the real denoisers' module names: public configs built on the meta
device, no weights) and the kit's default-target LoRA at rank 4, every file form the kit writes or wrote
x every loader modeled in difflora_kit/loader_rules.py -> "applied/total, strength". The loaders are models
written after each tool's published source (cited in loader_rules.py), checked against the real diffusers
loaders and the kit's own loader in tests/test_loader_rules.py and against ComfyUI's measured counts; this
table is what those rules predict, not a run of ComfyUI, AUTOMATIC1111 or DiffSynth-Studio.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import diffusers  # noqa: E402
import torch  # noqa: E402

from difflora_kit import kohya, lora, loader_rules as lr  # noqa: E402
from difflora_kit.backends import registry  # noqa: E402
from difflora_kit.config import TrainConfig  # noqa: E402

FAMILIES = ("sd15", "sdxl", "flux", "zimage")
RANK = 4
FORMS = ("peft keys, alpha != r (old)", "peft keys, folded (alpha = r)", "kohya export", "DiffSynth native")


def denoiser(family: str):
    """The real `family` denoiser with the kit's default-target rank-4 LoRA attached, on the meta device."""
    row = registry.get(family)
    with torch.device("meta"):
        model = getattr(diffusers, row.denoiser_class).from_config(row.public.unet)
    targets = TrainConfig().targets if row.denoiser_folder == "unet" else row.backend_class().targets_for(row.public.unet)
    lora.attach(model, RANK, RANK, targets)
    tensors, config = lora.adapter_state(model)
    return [n for n, _ in model.named_modules() if n], lora.LoraFile(tensors, config, {"base": family}), row.lora_prefix


def forms(family: str, lf: lora.LoraFile, prefix: str) -> dict[str, tuple[dict, dict, dict] | str]:
    """{form: (keys -> shapes, header, scalars)} of each file form, or why the kit cannot write it."""
    keys = {prefix + k[len("unet"):]: tuple(v.shape) for k, v in lf.tensors.items()}

    def header(alpha):
        config = {**lf.config, "r": RANK, "lora_alpha": alpha}
        return {"format": "pt", lr.METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()})}

    out = {FORMS[0]: (keys, header(2 * RANK), {}), FORMS[1]: (keys, header(RANK), {})}
    modules = lf.modules()
    scalings = {n: lf.scaling(n) for n in modules}
    try:
        if not registry.get(family).kohya:
            raise NotImplementedError("the kit has no kohya names for this family (lora.save_kohya refuses it)")
        tensors, kheader = kohya.to_kohya(modules, scalings, {**lf.meta, "family": family})
        kkeys = {k: tuple(v.shape) for k, v in tensors.items()}
        out[FORMS[2]] = (kkeys, kheader, {k: float(kkeys[k[:-6] + ".lora_down.weight"][0]) for k in kkeys
                                          if k.endswith(".alpha")})
    except (ValueError, NotImplementedError) as e:
        out[FORMS[2]] = f"not written: {str(e)[:80]}"
    try:
        from difflora_kit import diffsynth

        tensors = diffsynth.to_diffsynth(modules, scalings, family)
        out[FORMS[3]] = ({k: tuple(v.shape) for k, v in tensors.items()}, {"format": "pt"}, {})
    except ImportError:
        out[FORMS[3]] = "not written: difflora_kit.diffsynth absent"
    except (ValueError, NotImplementedError, RuntimeError) as e:
        out[FORMS[3]] = f"not written: {str(e)[:80]}"
    return out


def cell(r: lr.Reading) -> str:
    return f"{r.applied}/{r.total} {r.strength}"


def main() -> None:
    rows = []
    for family in FAMILIES:
        names, lf, prefix = denoiser(family)
        for form, content in forms(family, lf, prefix).items():
            if isinstance(content, str):
                rows.append({"family": family, "form": form, "readings": None, "note": content})
                continue
            keys, header, scalars = content
            got = lr.readings(keys, header, family, names, scalars)
            rows.append({"family": family, "form": form, "note": "", "readings": [
                {"loader": r.loader, "applied": r.applied, "total": r.total, "strength": r.strength,
                 "complete": r.complete, "why": r.why, "note": r.note, "left_out_examples": list(r.left_out[:3])}
                for r in got]})
            print(family, form, " | ".join(f"{r.loader}: {cell(r)}" for r in got), flush=True)
    head = "| family | file form | " + " | ".join(lr.LOADERS) + " |"
    lines = [head, "|" + "---|" * (2 + len(lr.LOADERS))]
    for row in rows:
        cells = ([f"{r['applied']}/{r['total']} {r['strength']}" + (" **ok**" if r["complete"] else "")
                  for r in row["readings"]] if row["readings"] else [row["note"]] + [""] * (len(lr.LOADERS) - 1))
        lines.append(f"| {row['family']} | {row['form']} | " + " | ".join(cells) + " |")
    whys = sorted({(r["loader"], r["why"]) for row in rows if row["readings"] for r in row["readings"] if r["why"]})
    table = ("Predicted by difflora_kit/loader_rules.py (each loader's key map and scale rule, modeled from its "
             f"published source) for the kit's default-target rank-{RANK} LoRA on the real denoisers' module names "
             "(public configs, meta device). Cell: modules applied / modules in the file, strength "
             "(right: every applied module at the file's alpha / r; **ok**: all applied and right). The old peft "
             f"file has alpha = {2 * RANK} (scale 2), the folded one alpha = r with the scale in B.\n\n"
             + "\n".join(lines) + "\n\nWhy cells fall short:\n\n" + "\n".join(f"- {l}: {w}" for l, w in whys))
    table += "\n\n" + DECISION
    print(table)
    write_result("loader_matrix", {"rank": RANK, "forms": FORMS, "loaders": lr.LOADERS, "rows": rows}, table)


DECISION = """## Decision

Two files for SD 1.5 and SDXL, one for FLUX and Z-Image:

- **No single file loads completely everywhere.** The peft-keyed file (folded, alpha = r) is complete in
  diffusers (both loaders), peft and the kit, and in ComfyUI for FLUX and Z-Image; on SD 1.5 and SDXL,
  ComfyUI maps only the UNet's non-attention modules of it (76/204, 174/734: every attention projection is
  "lora key not loaded") and AUTOMATIC1111 none. The kohya export is complete in ComfyUI, AUTOMATIC1111,
  diffusers' load_lora_weights and the kit, but not in `load_lora_adapter` (no "unet." prefix), which the
  kit's README documents. So `pair`, `pairs` and `train` on SD 1.5 / SDXL write the peft file
  (`lora1.safetensors`: diffusers, peft, the kit, DiffSynth after `difflora convert --to diffsynth`) and
  beside it the kohya file (`lora1.kohya.safetensors`: ComfyUI, AUTOMATIC1111).
- **FLUX and Z-Image: the peft file alone** (folded) is complete in diffusers, ComfyUI and the kit
  (AUTOMATIC1111 loads neither family); a kohya FLUX file adds nothing but is available by `convert`.
- **Fold the scale into B (alpha = r)**: with the old alpha != r files, every loader that ignores the
  header (ComfyUI, `load_lora_adapter(path)`, DiffSynth) reads scale 1 instead of alpha / r; folded,
  all of them read it right.
- **DiffSynth-Studio reads neither on SD 1.5, SDXL and Z-Image**: its GeneralLoRALoader keeps the "unet." /
  "transformer." prefix (0 modules fused) and its SDXL kohya table knows only LDM names; on FLUX it renames
  both the peft and the kohya file completely. Its own form (`difflora convert --to diffsynth`) is the file
  for it everywhere, and the kit reads it back. (A kohya file of Z-Image, which the kit does not write, would
  be no file for ComfyUI either: its fused attention takes only ComfyUI's own names there.) For Z-Image,
  ComfyUI gets the peft file.

Which file goes into which tool: diffusers / peft / the kit / DiffSynth-via-convert -> `*.safetensors`
(peft keys); ComfyUI and AUTOMATIC1111 on SD 1.5 / SDXL -> `*.kohya.safetensors`; ComfyUI on FLUX /
Z-Image -> `*.safetensors`."""


if __name__ == "__main__":
    main()
