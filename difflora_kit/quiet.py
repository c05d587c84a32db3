"""Loading a model without the libraries' progress bars and notes that mean nothing to a learner
("Loading weights: 100%", "`torch_dtype` is deprecated"): the kit's own bars and errors stay."""

from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def quiet_loading():
    """Within the block, transformers' and diffusers' progress bars are off and their info/warning
    logs silenced; both come back as they were afterwards."""
    import diffusers
    import transformers

    libraries = (transformers.utils.logging, diffusers.utils.logging)
    bars = [lib.is_progress_bar_enabled() for lib in libraries]
    levels = [lib.get_verbosity() for lib in libraries]
    for lib in libraries:
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated")
            yield
    finally:
        for lib, bar, level in zip(libraries, bars, levels):
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()
