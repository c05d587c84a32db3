"""The project's own files agree: environment.yml, the pinned constraints, pyproject's ranges."""

import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    lines = (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))


def test_environment_yml_lists_the_pinned_versions():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = dict(x.split("==") for x in pip if "==" in x)
    assert listed == pins()


def test_pyproject_ranges_admit_the_pins_and_name_every_core_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["notebooks"]]
    by_name = {r.name: r for r in reqs}
    for name, version in pins().items():
        assert name in by_name, f"{name} is pinned but not a dependency"
        assert by_name[name].specifier.contains(version), f"{name}=={version} outside {by_name[name].specifier}"
    assert "torch" in by_name and by_name["torch"].specifier.contains("2.4.0")  # keeps Colab's torch


def test_weights_in_data_samples_are_safetensors_only():
    files = [p for p in (ROOT / "data_samples").rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert list((ROOT / "data_samples").rglob("*.safetensors"))
