"""Loading a base prints no library progress bars, and leaves the libraries' settings as they were."""

import transformers

from difflora_kit import backends


def test_loading_prints_no_progress_bars_and_restores_the_settings(capfd):
    transformers.utils.logging.enable_progress_bar()
    backends.load_backend("toy", "cpu")
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err and "it/s" not in out + err
    assert transformers.utils.logging.is_progress_bar_enabled()
