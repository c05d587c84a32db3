"""LoRA 2's health report (difflora_kit.health): the x0 estimate, the figures on the toy (a zeroed LoRA, a
scaled one, the control), its cost against training, the CLI (pair, pairs --duds), the SD / SDXL / FLUX backends."""

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from difflora_kit import cli, diffusion, health, lora, many_pairs
from difflora_kit.config import TrainConfig
from difflora_kit.demo import DEFAULT_PAIRS
from difflora_kit.images import load_image
from difflora_kit.pair import prepare_base, train_pair, train_stage
from difflora_kit.toy.pairs import read_pairs

FIGURES = ("own_change", "other_change", "transfer", "drag", "own_drag", "along", "across", "drag_control", "leak")


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample", "flow", "flow_dynamic"])
def test_predicted_x0_inverts_noisy_and_target(kind):
    if kind.startswith("flow"):
        dynamic = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                       max_image_seq_len=4096) if kind == "flow_dynamic" else {}
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, **dynamic)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 300, 700, 999])
    x_t, target = diffusion.noisy_and_target(scheduler, x0, noise, t)
    torch.testing.assert_close(diffusion.predicted_x0(scheduler, x_t, target, t), x0, rtol=1e-4, atol=1e-4)


def _scaled(the_lora: lora.LoraFile, factor: float) -> lora.LoraFile:
    """The LoRA with every lora_B multiplied by `factor` (0: a LoRA that changes nothing)."""
    return lora.LoraFile({k: v * factor if ".lora_B." in k else v for k, v in the_lora.tensors.items()},
                         the_lora.config, dict(the_lora.meta))


class _RowCounter:
    """Counts the rows (images) every toy denoiser call runs while it is installed."""

    def __init__(self):
        self.rows, self._patch = 0, pytest.MonkeyPatch()

    def __enter__(self):
        from difflora_kit.backends.toy import ToyBackend

        original = ToyBackend.denoiser

        def counted(backend, x, t, states):
            self.rows += int(x.shape[0])
            return original(backend, x, t, states)

        self._patch.setattr(ToyBackend, "denoiser", counted)
        return self

    def __exit__(self, *exc):
        self._patch.undo()


@pytest.fixture(scope="module")
def toy():
    """ONE toy pair and its control (a LoRA on image 2 alone), TrainConfig(steps=30), and LoRA 2's report,
    with the denoiser rows that the pair's training and the report ran."""
    row = read_pairs(DEFAULT_PAIRS)[0]
    cfg = TrainConfig(steps=30)
    image1, image2 = load_image(row["image1"]), load_image(row["image2"])
    with _RowCounter() as training:
        result = train_pair(image1, image2, row["prompt"], cfg, progress=False)
    control = train_stage(image2, row["prompt"], cfg, "toy", None, progress=False).lora
    base = prepare_base("toy", cfg)  # the plain base: LoRA 1 dropped
    with _RowCounter() as reporting:
        report = health.report(base, result.lora2, row["prompt"], image2)
    return dict(row=row, image2=image2, lora2=result.lora2, control=control, base=base, report=report,
                pair_rows=training.rows, report_rows=reporting.rows)


def _show(name, figures):
    print(name, {k: round(figures[k], 4) for k in FIGURES}, figures.get("verdict", ""))


def test_report_figures_are_finite_zero_for_a_zero_lora_and_grow_with_its_scale(toy):
    rep = toy["report"]
    _show("lora2", rep)
    assert all(math.isfinite(rep[k]) for k in FIGURES + ("scale", "seconds"))
    assert rep["verdict"] in (health.TRANSFERS, health.NO_EFFECT, health.DRAGS) and rep["verdict"] in rep["line"]
    assert len(rep["other_changes"]) == len(rep["other_prompts"]) == 8 and toy["row"]["prompt"] not in rep["other_prompts"]
    assert json.loads(json.dumps(rep)) == rep  # JSON as it is (report.json)

    zero = health.report(toy["base"], _scaled(toy["lora2"], 0.0), toy["row"]["prompt"], toy["image2"])
    _show("zeroed", zero)
    assert zero["other_change"] == 0 and zero["own_change"] == 0 and zero["verdict"] == health.NO_EFFECT
    up = health.measure(toy["base"], _scaled(toy["lora2"], 5.0), toy["row"]["prompt"], toy["image2"])
    _show("x5", up)
    assert up["other_change"] > rep["other_change"]
    again = health.measure(toy["base"], toy["lora2"], toy["row"]["prompt"], toy["image2"])  # the base is reusable
    assert again["other_change"] == rep["other_change"] and again["drag"] == rep["drag"]


def test_the_control_drags_more_than_lora2(toy):
    control = health.report(toy["base"], toy["control"], toy["row"]["prompt"], toy["image2"])
    _show("control", control)
    assert control["drag"] > toy["report"]["drag"]


def test_the_report_costs_under_a_tenth_of_the_pairs_training(toy):
    """Counted in denoiser rows, not seconds (timings are the benchmarks': bench/health_validation.py): the
    report's forward-only rows against a default pair's training, whose every row also runs a backward."""
    cfg = TrainConfig(steps=30)
    assert toy["pair_rows"] == 2 * cfg.steps * cfg.batch  # what a pair's training runs: two stages of steps x batch
    default = TrainConfig()
    print(f"report {toy['report_rows']} rows ({toy['report']['seconds']:.2f} s), "
          f"default pair training {2 * default.steps * default.batch} rows")
    assert 0 < toy["report_rows"] < 0.1 * 2 * default.steps * default.batch


def test_verdict_labels_follow_the_thresholds_and_stamp_goes_into_the_saved_lora(toy, tmp_path):
    figures = {"own_change": 0.3, "other_change": 0.2, "transfer": 0.67, "drag": 0.01, "own_drag": 0.0}
    th = health.Thresholds(no_effect_below=0.05, drags_above=0.15)
    assert health.verdict(figures, th)[0] == health.TRANSFERS
    assert health.verdict({**figures, "other_change": 0.01}, th)[0] == health.NO_EFFECT
    assert health.verdict({**figures, "drag": 0.3, "other_change": 0.01}, th)[0] == health.DRAGS  # drag first
    assert health.verdict({"drag": 0.01, "other_change": 0.01}, th)[0] == health.NO_EFFECT  # only what it decides on
    the_lora = _scaled(toy["lora2"], 1.0)
    health.stamp(the_lora, toy["report"])
    lora.save(tmp_path / "l.safetensors", the_lora)
    meta = lora.load(tmp_path / "l.safetensors").meta
    assert meta["health_verdict"] == toy["report"]["verdict"]
    assert float(meta["health_drag"]) == pytest.approx(toy["report"]["drag"], rel=1e-3)


def test_cli_pair_writes_the_report_and_stamps_lora2(tmp_path, capsys):
    row = read_pairs(DEFAULT_PAIRS)[0]
    out = tmp_path / "pair"
    assert cli.main(["pair", row["image1"], row["image2"], "--prompt", row["prompt"], "--steps", "4", "--batch", "2",
                     "--out", str(out)]) == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["verdict"] in (health.TRANSFERS, health.NO_EFFECT, health.DRAGS) and "advice" in rep
    assert lora.load(out / "lora2.safetensors").meta["health_verdict"] == rep["verdict"]
    assert f"LoRA 2 health: {rep['verdict']}" in capsys.readouterr().out
    # step 2 alone (train --preset-lora): OUT.report.json beside OUT, never overwritten without --force
    step2 = ["train", row["image2"], "--prompt", row["prompt"], "--preset-lora", str(out / "lora1.safetensors"),
             "--steps", "2", "--batch", "2", "--out", str(out / "again.safetensors")]
    assert cli.main(step2) == 0, capsys.readouterr().err
    assert json.loads((out / "again.report.json").read_text())["verdict"] == \
        lora.load(out / "again.safetensors").meta["health_verdict"]
    (out / "again.safetensors").unlink()
    assert cli.main(step2) == 2 and "again.report.json already exists" in capsys.readouterr().err


def test_cli_pairs_duds_drop_says_what_it_left_out(tmp_path, capsys):
    out = tmp_path / "pairs"
    code = cli.main(["pairs", str(DEFAULT_PAIRS), "--axis", "detail", "--limit", "2", "--steps", "4", "--batch", "2",
                     "--duds", "drop", "--out", str(out)])
    captured = capsys.readouterr()
    if code != 0:  # both LoRA 2s duds (thresholds moved?): a clear error naming the verdicts, nothing written
        assert code == 2 and "every LoRA 2 is a dud" in captured.err and "--duds keep" in captured.err
        assert not out.exists() and not list(tmp_path.glob(".*partial"))
        return
    index = json.loads((out / "index.json").read_text())
    verdicts = [e["verdict"] for e in index["pairs"]]
    assert all(json.loads((out / e["dir"] / "report.json").read_text())["verdict"] == e["verdict"] for e in index["pairs"])
    left = [d["dir"] for d in index["average"]["left_out"]]
    assert index["average"]["duds"] == "drop"
    assert left == [e["dir"] for e in index["pairs"] if e["verdict"] != health.TRANSFERS]
    assert len(index["average"]["members"]) == len(verdicts) - len(left)
    assert "duds (--duds drop): " + ("left out" if left else "none") in captured.out


def test_duds_records_down_weight_and_the_all_duds_error():
    entries = [{"dir": "pair_000", "verdict": health.TRANSFERS}, {"dir": "pair_001", "verdict": health.NO_EFFECT}]
    members, weights, record, note = many_pairs.dud_members(entries, "down-weight", 0.25)
    assert members == [0, 1] and weights == pytest.approx([0.8, 0.2])
    assert record["down_weighted"][0]["dir"] == "pair_001" and "down-weight" in note
    assert many_pairs.dud_members(entries, "drop", 0.25)[:2] == ([0], None)
    assert many_pairs.dud_members(entries, "keep", 0.25)[2]["kept_duds"] == [{"dir": "pair_001", "verdict": health.NO_EFFECT}]
    with pytest.raises(ValueError, match="every LoRA 2 is a dud.*no effect on other prompts.*--duds keep"):
        many_pairs.dud_members([{**e, "verdict": health.NO_EFFECT} for e in entries], "drop", 0.25)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_the_report_runs_on_the_tiny_real_families(family, tmp_path, capsys):
    from test_real_backends import _pair_images  # the random image pair of the SD backends' tests

    from difflora_kit.tiny_models import make_tiny_pipeline

    base = make_tiny_pipeline(family, tmp_path / "base")
    out = tmp_path / "pair"
    assert cli.main(["pair", *_pair_images(tmp_path), "--prompt", "a red circle", "--out", str(out), "--base", str(base),
                     "--steps", "2", "--batch", "2", "--lr", "0.05"]) == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert all(math.isfinite(rep[k]) for k in FIGURES) and rep["other_change"] > 0
    assert rep["other_prompts"] == list(health.GENERIC_PROMPTS)
    assert lora.load(out / "lora2.safetensors").meta["health_verdict"] == rep["verdict"]


def test_along_own_measures_the_share_of_the_own_change_and_what_else_moves():
    own = torch.tensor([1.0, 2.0, 0.0])
    assert health.along_own(2 * own, own) == pytest.approx((2.0, 0.0))
    along, across = health.along_own(torch.tensor([0.0, 0.0, 3.0]), own)  # moved, but none of it along
    assert along == 0.0 and across == pytest.approx(3.0 / own.norm().item())
    assert health.along_own(own, torch.zeros(3)) == (0.0, 0.0)


def test_the_descriptor_ignores_where_things_are_and_the_control_target_keeps_the_statistics():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    moved = torch.roll(x, shifts=(5, 3), dims=(-2, -1))
    C = x.shape[1]
    torch.testing.assert_close(health.descriptor(moved)[:, : 2 * C], health.descriptor(x)[:, : 2 * C])  # mean, spread
    z = torch.rand(1, 3, 16, 16)
    z2 = health.shifted(z)
    assert not torch.equal(z2, z) and torch.equal(z2.flatten().sort().values, z.flatten().sort().values)  # same values, moved
