"""Sampling solvers (SampleConfig.solver): DDIM, DPM-Solver++ 2M, UniPC on the toy and the SD
families; the flow families refuse them; the CLI flag."""

import numpy as np
import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from difflora_kit import backends, cli, diffusion, sample
from difflora_kit.config import SOLVERS, SampleConfig

PROMPTS = ["a blue cross on a white background", "a green square on a black background"]


@pytest.fixture(scope="module")
def toy():
    return backends.load_backend("toy", "cpu")


def test_each_solver_is_its_diffusers_scheduler_on_the_training_schedule(toy):
    kinds = {"ddim": DDIMScheduler, "dpmpp": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
    assert set(kinds) == set(SOLVERS)
    for solver, cls in kinds.items():
        sampler = diffusion.sampling_scheduler(toy.scheduler, solver)
        assert type(sampler) is cls and sampler.config.prediction_type == toy.scheduler.config.prediction_type
        sampler.set_timesteps(10)
        assert int(sampler.timesteps[0]) == toy.scheduler.config.num_train_timesteps - 1  # trailing: from pure noise
    with pytest.raises(ValueError, match="unknown solver"):
        SampleConfig(solver="euler_a")


def test_multistep_solvers_converge_to_the_same_images_as_ddim(toy):
    """At many steps every solver integrates the same ODE: the images agree far better than those of
    a 4-step DDIM do with the 50-step one."""
    run = lambda solver, steps: sample.sweep(toy, None, PROMPTS, [0, 1], [0.0], SampleConfig(steps=steps, solver=solver))
    reference = run("ddim", 50)
    coarse = np.abs(run("ddim", 4) - reference).mean()
    for solver in ("dpmpp", "unipc"):
        err = np.abs(run(solver, 50) - reference).mean()
        print(solver, f"mean |50-step - DDIM 50| {err:.4f}, DDIM 4 vs 50: {coarse:.4f}")
        assert err < 0.25 * coarse
        assert np.isfinite(run(solver, 8)).all()


def test_the_flow_families_refuse_another_solver_and_the_cli_takes_the_flag(tmp_path, capsys):
    from difflora_kit.tiny_models import make_tiny_pipeline

    flux = backends.load_backend(str(make_tiny_pipeline("flux", tmp_path / "flux")), "cpu")
    with pytest.raises(ValueError, match="flow-matching Euler"):
        sample.sweep(flux, None, ["a cat"], [0], [0.0], SampleConfig(steps=2, solver="dpmpp"))
    out = tmp_path / "s.png"
    code = cli.main(["sample", "--prompt", PROMPTS[0], "--out", str(out), "--solver", "unipc", "--sample-steps", "6"])
    assert code == 0 and out.is_file()
    with pytest.raises(SystemExit) as bad:  # argparse's own error for a choice it does not know
        cli.main(["sample", "--prompt", PROMPTS[0], "--out", str(tmp_path / "t.png"), "--solver", "heun"])
    assert bad.value.code == 2 and "--solver" in capsys.readouterr().err and not (tmp_path / "t.png").exists()
