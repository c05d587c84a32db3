"""A LoRA 2 is never lost to its health report (issue 18, item 5): it is written before the report runs, the
training model is gone before the report's plain base loads, and a report that fails (a GPU out of memory
or any other error, injected here on the CPU) leaves LoRA 2 and LoRA 1 on disk as trained, no report.json,
no half-written file, and a warning that says where LoRA 2 is and what to do."""

import json
import re
import weakref

import pytest
import torch

from difflora_kit import cli, health, lora, many_pairs, pair, pair_files
from difflora_kit.config import TrainConfig
from difflora_kit.demo import DEFAULT_PAIRS
from difflora_kit.images import load_image
from difflora_kit.toy.pairs import read_pairs

CFG = TrainConfig(steps=2, batch=2)
ROW = read_pairs(DEFAULT_PAIRS)[0]
OOM = "CUDA out of memory. Tried to allocate 20.00 GiB"


def _same_lora(path, trained: lora.LoraFile) -> None:
    """The file holds the trained LoRA's tensors, bit for bit, and its metadata (no health_* fields)."""
    on_disk = lora.load(path)
    assert on_disk.tensors.keys() == trained.tensors.keys()
    assert all(torch.equal(on_disk.tensors[k], trained.tensors[k].cpu()) for k in trained.tensors)
    assert not [k for k in on_disk.meta if k.startswith("health_")]
    assert {k: str(v) for k, v in trained.meta.items()}.items() <= on_disk.meta.items()


def _left_over(folder) -> list[str]:
    """Half-written files and checkpoints left in `folder`."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".partial") or ".checkpoint." in p.name)


@pytest.fixture
def finished(monkeypatch):
    """{file name: the LoRA pair_files.finish wrote there}: what training handed over, before any report."""
    written, real = {}, pair_files.finish

    def spy(path, the_lora, checkpoint):
        written[path.name] = lora.LoraFile(dict(the_lora.tensors), the_lora.config, dict(the_lora.meta))  # as it was
        return real(path, the_lora, checkpoint)

    monkeypatch.setattr(pair_files, "finish", spy)
    return written


def test_lora2_is_on_disk_and_the_training_model_gone_before_the_plain_base_loads(tmp_path, monkeypatch, finished):
    trained, bases = [], []
    real_train, real_prepare = pair.train_lora, pair_files.prepare_base

    def spy_train(backend, *args, **kwargs):  # every training model of the pair, by weak reference
        trained.append((weakref.ref(backend), weakref.ref(backend.unet)))
        return real_train(backend, *args, **kwargs)

    def spy_prepare(*args, **kwargs):  # the report's plain base: LoRA 2 is written, no training model is alive
        out = tmp_path / "pair"
        assert (out / "lora2.safetensors").is_file() and not (out / "report.json").exists()
        _same_lora(out / "lora2.safetensors", finished["lora2.safetensors"])
        assert len(trained) == 2 and all(ref() is None for refs in trained for ref in refs), "a training model is alive"
        bases.append(real_prepare(*args, **kwargs))
        return bases[-1]

    monkeypatch.setattr(pair, "train_lora", spy_train)
    monkeypatch.setattr(pair_files, "prepare_base", spy_prepare)
    written = pair_files.train_pair_to_folder(tmp_path / "pair", ROW["image1"], ROW["image2"], ROW["prompt"], CFG,
                                              progress=False)
    assert len(bases) == 1 and written.report_error is None
    report = json.loads((tmp_path / "pair" / "report.json").read_text())
    stamped = lora.load(tmp_path / "pair" / "lora2.safetensors")  # rewritten with the verdict, the same tensors
    assert stamped.meta["health_verdict"] == report["verdict"] == written.report["verdict"]
    assert all(torch.equal(stamped.tensors[k], finished["lora2.safetensors"].tensors[k].cpu()) for k in stamped.tensors)
    assert _left_over(tmp_path) == []


@pytest.mark.parametrize("error", [torch.OutOfMemoryError(OOM), RuntimeError("a bug in the report")],
                         ids=["out-of-memory", "other-error"])
def test_a_failed_report_leaves_both_loras_as_trained_and_says_what_to_do(error, tmp_path, monkeypatch, capsys,
                                                                          finished):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(health, "report", failing)
    out = tmp_path / "pair"
    code = cli.main(["pair", ROW["image1"], ROW["image2"], "--prompt", ROW["prompt"], "--steps", "2", "--batch", "2",
                     "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err  # the LoRAs are the product: written, complete, a warning for the report
    _same_lora(out / "lora1.safetensors", finished["lora1.safetensors"])
    _same_lora(out / "lora2.safetensors", finished["lora2.safetensors"])
    assert not (out / "report.json").exists() and _left_over(tmp_path) == []
    assert f"difflora: warning: LoRA 2 is safe on disk at {out / 'lora2.safetensors'} (LoRA 1 at " in err
    assert "Do not retrain" in err and "--no-report" in err and "pair_files.report_on_file(" in err
    if isinstance(error, torch.OutOfMemoryError):
        assert "the GPU ran out of memory (OutOfMemoryError: CUDA out of memory" in err and "max_batch=2" in err
    else:
        assert "it raised an error (RuntimeError: a bug in the report)" in err


def test_a_report_out_of_memory_in_step_2_alone_then_the_report_run_later(tmp_path, monkeypatch, finished):
    """`difflora train --preset-lora`: the GPU runs out inside the report's denoiser calls (health explains it:
    ReportOutOfMemory); OUT stays as trained, OUT.report.json is not written; report_on_file runs it later."""
    lora1 = pair.train_stage(load_image(ROW["image1"]), ROW["prompt"], CFG, "toy", None, progress=False).lora
    real_prepare = pair_files.prepare_base

    def out_of_memory_base(*args, **kwargs):
        backend = real_prepare(*args, **kwargs)

        def denoiser(x, t, states):
            raise torch.OutOfMemoryError(OOM)

        backend.denoiser = denoiser
        return backend

    monkeypatch.setattr(pair_files, "prepare_base", out_of_memory_base)
    out = tmp_path / "step2.safetensors"
    with pytest.warns(pair_files.ReportFailedWarning, match=f"LoRA 2 is safe on disk at {re.escape(str(out))}") as caught:
        written = pair_files.train_stage_to_file(out, ROW["image2"], ROW["prompt"], CFG, preset=lora1, progress=False)
    message = str(caught[0].message)
    assert "the GPU ran out of memory (ReportOutOfMemory: the GPU ran out of memory in the health report's" in message
    assert written.report is None and written.report_path is None and written.report_error == message
    _same_lora(out, finished["step2.safetensors"])
    assert not pair_files.stage_report_path(out).exists() and _left_over(tmp_path) == []

    monkeypatch.setattr(pair_files, "prepare_base", real_prepare)  # later, with memory to spare
    report = pair_files.report_on_file(out, ROW["image2"], ROW["prompt"], "toy",
                                       health_cfg=health.HealthConfig(max_batch=2))
    assert report["rows_per_call"] == 2
    assert json.loads(pair_files.stage_report_path(out).read_text())["verdict"] == report["verdict"]
    assert lora.load(out).meta["health_verdict"] == report["verdict"]
    assert all(torch.equal(lora.load(out).tensors[k], finished["step2.safetensors"].tensors[k].cpu())
               for k in finished["step2.safetensors"].tensors)


def test_pairs_go_on_when_a_report_fails_and_no_plain_base_outlives_its_report(tmp_path, monkeypatch):
    """`difflora pairs`: pair 0's report runs out of memory: its LoRAs are kept in the written folder without a
    verdict (index.json says why), pair 1 is reported; no report's plain base is alive while a pair trains."""
    plains, real_report, real_prepare, real_train = [], health.report, pair_files.prepare_base, pair.train_lora

    def prepare(*args, **kwargs):
        backend = real_prepare(*args, **kwargs)
        plains.append(weakref.ref(backend))  # weak: the only strong reference is report_written's
        return backend

    def train(backend, *args, **kwargs):
        assert all(ref() is None for ref in plains), "a report's plain base is alive beside a training model"
        return real_train(backend, *args, **kwargs)

    def first_fails(backend, lora2, prompt, *args, **kwargs):
        if len(plains) == 1:
            raise torch.OutOfMemoryError(OOM)
        return real_report(backend, lora2, prompt, *args, **kwargs)

    monkeypatch.setattr(pair_files, "prepare_base", prepare)
    monkeypatch.setattr(pair, "train_lora", train)
    monkeypatch.setattr(health, "report", first_fails)
    out = tmp_path / "pairs"
    with pytest.warns(pair_files.ReportFailedWarning, match=re.escape(f"LoRA 2 is safe on disk at {out / 'pair_000'}")):
        result = many_pairs.run(out, DEFAULT_PAIRS, CFG, axis="detail", limit=2, progress=False)
    first, second = result.index["pairs"]
    assert "verdict" not in first and "ran out of memory" in first["report_failed"] and "verdict" in second
    assert (out / "pair_000" / "lora2.safetensors").is_file() and not (out / "pair_000" / "report.json").exists()
    assert "health_verdict" not in lora.load(out / "pair_000" / "lora2.safetensors").meta
    assert lora.load(out / "pair_001" / "lora2.safetensors").meta["health_verdict"] == second["verdict"]
    assert [u["dir"] for u in result.index["average"]["unreported"]] == ["pair_000"]
    assert len(result.index["average"]["members"]) == 2 and "pair_000" in result.dud_note
    assert len(plains) == 2 and _left_over(tmp_path) == []


def test_duds_with_a_report_that_failed():
    entries = [{"dir": "pair_000", "verdict": health.TRANSFERS}, {"dir": "pair_001", "verdict": health.NO_EFFECT},
               {"dir": "pair_002", "report_failed": "LoRA 2 is safe on disk ...: the GPU ran out of memory"}]
    members, weights, record, note = many_pairs.dud_members(entries, "drop", 0.25)
    assert members == [0, 2] and weights is None and [d["dir"] for d in record["left_out"]] == ["pair_001"]
    assert record["unreported"][0]["dir"] == "pair_002" and "pair_002" in note
    members, weights, record, _ = many_pairs.dud_members(entries, "down-weight", 0.25)
    assert members == [0, 1, 2] and weights == pytest.approx([1 / 2.25, 0.25 / 2.25, 1 / 2.25])
    members, weights, record, note = many_pairs.dud_members([entries[2]], "drop", 0.25)
    assert members == [0] and record["duds"] == "keep" and "no health report could run" in note
