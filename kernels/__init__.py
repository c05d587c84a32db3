"""Fused LoRA-merge kernels for the int8 base, installed as `difflora_kit.kernels`.

This folder sits at the top of the repository (beside its README and benchmarks) but is only
importable under the package's own name: pyproject maps it to `difflora_kit.kernels`. A PyPI
package called `kernels` exists, and bitsandbytes and transformers probe `import kernels` at
start-up; from the repository root (on sys.path) this folder would shadow it. Seen under that bare
name it stays empty: it runs no code, exposes nothing and has no submodules, so those probes find
"no usable kernels package", exactly as on a machine without the PyPI package.
"""
if __name__ == "kernels":
    __path__ = []  # no `kernels.lora_merge` under the wrong name
    __all__ = []
else:
    from .lora_merge import (
        dequant_merge,
        dequant_merge_reference,
        merge_quantize,
        merge_quantize_reference,
        quantize_rowwise_reference,
        remerge_int8,
        remerge_int8_reference,
        use_triton,
    )

    __all__ = [
        "dequant_merge",
        "dequant_merge_reference",
        "merge_quantize",
        "merge_quantize_reference",
        "quantize_rowwise_reference",
        "remerge_int8",
        "remerge_int8_reference",
        "use_triton",
    ]
