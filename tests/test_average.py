"""Averaging LoRAs (difflora_kit.average and `difflora average` / `difflora pairs`).

Members are tiny random LoRAs on the toy denoiser's own modules (attention linears and 3x3
ResNet convolutions), of different ranks and alphas, so the tests run in seconds. The oracle
for the exact average is peft's own `add_weighted_adapter(..., combination_type="cat")`; the
oracle for the SVD is a full SVD of each layer's delta-W matrix, computed here.
"""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model

from difflora_kit import average, backends, cli, lora
from difflora_kit.config import TrainConfig
from difflora_kit.demo import DEFAULT_PAIRS
from difflora_kit.lora import LoraMismatchError


def random_lora(rank: int, alpha: float, seed: int) -> lora.LoraFile:
    """A LoRA of the toy denoiser's shapes with random A and B (B != 0, unlike a fresh one)."""
    unet = backends.load_backend("toy").unet
    lora.attach(unet, rank, alpha, TrainConfig().targets, "rand")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".rand." in name and "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    tensors, config = lora.adapter_state(unet, "rand")
    return lora.LoraFile(tensors, config, {"stage": "2", "base": "toy"})


@pytest.fixture(scope="module")
def members():
    """Three LoRAs of ranks 4, 8, 2 and alphas 4, 2, 6 (scales 1, 0.25, 3)."""
    return [random_lora(4, 4, 0), random_lora(8, 2, 1), random_lora(2, 6, 2)]


def reference_delta(lf: lora.LoraFile, name: str) -> torch.Tensor:
    """(alpha/r) B @ A for one module, written out here (not lora.delta_weight): conv A (r, in, kh, kw), B (out, r, 1, 1)."""
    A, B = lf.modules()[name]
    r = lf.config.get("rank_pattern", {}).get(name, lf.config["r"])
    alpha = lf.config.get("alpha_pattern", {}).get(name, lf.config["lora_alpha"])
    mat = torch.einsum("or,rk->ok", B.double().reshape(B.shape[0], -1), A.double().reshape(A.shape[0], -1))
    return (alpha / r) * mat.reshape(B.shape[0], *A.shape[1:])


def close(a, b, tol=1e-5):
    """|a - b| small against the size of b."""
    return float((a.double() - b.double()).abs().max()) <= tol * max(float(b.double().abs().max()), 1e-12)


def peft_cat(loras, weights):
    """peft's own concatenation merge on the toy denoiser: {module: delta-W of the merged adapter}, its rank."""
    def config(l):
        return LoraConfig(r=l.rank, lora_alpha=l.alpha, target_modules=l.config["target_modules"])

    model = get_peft_model(backends.load_backend("toy").unet, config(loras[0]), adapter_name="m0")
    for i, l in enumerate(loras[1:], 1):
        model.add_adapter(f"m{i}", config(l))
    root = model.base_model.model
    with torch.no_grad():
        for i, l in enumerate(loras):
            for name, (A, B) in l.modules().items():
                root.get_submodule(name).lora_A[f"m{i}"].weight.copy_(A)
                root.get_submodule(name).lora_B[f"m{i}"].weight.copy_(B)
    model.add_weighted_adapter([f"m{i}" for i in range(len(loras))], weights, "avg", combination_type="cat")
    names = loras[0].modules()
    with torch.no_grad():
        deltas = {n: root.get_submodule(n).get_delta_weight("avg") for n in names}
    return deltas, model.peft_config["avg"].r


# --------------------------------------------------------------------------------- exact


@pytest.mark.parametrize("weights", [None, [0.7, -0.4, 0.2]])
def test_exact_average_equals_peft_cat(members, weights):
    N = len(members)
    ours = average.exact_average(members, weights)
    theirs, peft_rank = peft_cat(members, weights or [1.0 / N] * N)
    deltas = lora.module_deltas(ours)
    assert ours.rank == peft_rank == 4 + 8 + 2
    assert set(deltas) == set(theirs) and len(deltas) == 62
    assert any(d.dim() == 4 for d in deltas.values())  # conv layers are in it
    for name in deltas:
        assert deltas[name].shape == theirs[name].shape
        assert close(deltas[name], theirs[name]), name
        assert not close(deltas[name], reference_delta(members[0], name), 0.1)  # not just one member


def test_different_ranks_and_a_negative_weight(members, tmp_path):
    weights = [1.5, -0.5, 0.25]
    avg = average.exact_average(members, weights)
    lora.save(tmp_path / "avg.safetensors", avg)
    back = lora.load(tmp_path / "avg.safetensors")
    deltas = lora.module_deltas(back)
    for name in deltas:
        want = sum(w * reference_delta(m, name) for w, m in zip(weights, members))
        assert close(deltas[name], want), name
        assert back.scaling(name) == 1.0
    A, B = back.modules()[next(iter(deltas))]
    assert A.shape[0] == B.shape[1] == 14


def test_average_of_copies_is_the_lora_itself(members):
    one = members[1]
    for avg in (average.exact_average([one] * 3), average.svd_average([one] * 3, rank=one.rank)[0],
                average.exact_average([one] * 2, [2.0, -1.0])):
        deltas = lora.module_deltas(avg)
        for name in deltas:
            assert close(deltas[name], reference_delta(one, name)), name


def test_averaged_file_records_members_weights_and_method(members, tmp_path):
    path = tmp_path / "avg.safetensors"
    lora.save(path, average.exact_average(members, [0.5, 0.25, 0.25]))
    meta = lora.load(path).meta
    assert meta["stage"] == "average" and meta["method"] == "exact" and meta["rank"] == "14"
    assert meta["members"].split(",") == [m.digest() for m in members]
    assert meta["weights"] == "0.5,0.25,0.25"
    lora.save(path, average.svd_average(members, rank="auto", energy=0.95)[0])
    meta = lora.load(path).meta
    assert meta["method"] == "svd" and meta["rank"] == "auto" and meta["energy_target"] == "0.95"
    assert float(meta["energy_kept"]) >= 0.95 and meta["members"].split(",") == [m.digest() for m in members]


# ------------------------------------------------------------------------------------ SVD


def test_svd_at_full_rank_is_the_exact_average(members):
    exact = lora.module_deltas(average.exact_average(members))
    compressed, report = average.svd_average(members, rank=14)
    deltas = lora.module_deltas(compressed)
    for name in exact:
        assert close(deltas[name], exact[name], 1e-4), name
        A, B = compressed.modules()[name]
        if A.dim() == 4:  # conv: A (r, in, kh, kw), B (out, r, 1, 1)
            assert A.shape[2:] == exact[name].shape[2:] and B.shape[2:] == (1, 1)
    assert report.energy == pytest.approx(1.0, abs=1e-9)
    assert min(e.fraction for e in report.layers.values()) == pytest.approx(1.0, abs=1e-9)


def test_svd_to_rank_k_is_the_best_rank_k_and_reports_its_energy(members):
    exact = lora.module_deltas(average.exact_average(members))
    compressed, report = average.svd_average(members, rank=3)
    deltas = lora.module_deltas(compressed)
    kept_all = total_all = 0.0
    for name, d in exact.items():
        S = torch.linalg.svdvals(d.double().flatten(1))  # the oracle: SVD of the whole (out, in*kh*kw) matrix
        assert report.layers[name].rank == 3 and compressed.modules()[name][0].shape[0] == 3
        err = float((deltas[name].double() - d.double()).norm())
        assert err == pytest.approx(float(S[3:].pow(2).sum().sqrt()), rel=1e-4)  # Eckart-Young: the best rank 3
        assert report.layers[name].fraction == pytest.approx(float(S[:3].pow(2).sum() / S.pow(2).sum()), rel=1e-6)
        kept_all, total_all = kept_all + float(S[:3].pow(2).sum()), total_all + float(S.pow(2).sum())
    assert report.energy == pytest.approx(kept_all / total_all, rel=1e-6)
    assert 0.3 < report.energy < 0.99


@pytest.mark.parametrize("energy", [0.9, 0.99])
def test_auto_rank_keeps_the_target_energy_with_the_fewest_directions(members, tmp_path, energy):
    exact = lora.module_deltas(average.exact_average(members))
    compressed, report = average.svd_average(members, rank="auto", energy=energy)
    path = tmp_path / "auto.safetensors"
    lora.save(path, compressed)
    back = lora.load(path)
    deltas = lora.module_deltas(back)
    ranks = average.module_ranks(back)
    assert len(set(ranks.values())) > 1 and back.config["rank_pattern"]  # layers got different ranks
    for name, d in exact.items():
        S2 = torch.linalg.svdvals(d.double().flatten(1)).pow(2)
        k = ranks[name]
        kept = float(deltas[name].double().norm() ** 2 / d.double().norm() ** 2)  # ||dW_k||^2 / ||dW||^2
        assert kept >= energy - 1e-6, name
        assert float(S2[: k - 1].sum() / S2.sum()) < energy, name  # one direction fewer would not do
        assert report.layers[name].rank == k
    assert report.energy >= energy - 1e-9

    # diffusers rebuilds the per-layer ranks from the file's rank_pattern / alpha_pattern
    unet = UNet2DConditionModel.from_pretrained(backends.resolve("toy") / "unet")
    unet.load_lora_adapter(str(path), prefix="unet", adapter_name="auto")
    for name in list(deltas)[::7]:
        layer = unet.get_submodule(name)
        assert layer.r["auto"] == ranks[name]
        with torch.no_grad():
            assert close(layer.get_delta_weight("auto"), deltas[name]), name


# --------------------------------------------------------------------------- the wrong way


def test_naive_average_is_wrong_for_different_loras_and_right_for_copies(members):
    a, b = members[0], random_lora(4, 4, 3)
    err = average.naive_error([a, b])
    assert err.pooled > 0.1 and min(err.layers.values()) > 0.01
    # the same number, by hand: mean(B) @ mean(A) (equal scales 1) against the mean of B @ A
    num = den = 0.0
    for name, (A1, B1) in a.modules().items():
        A2, B2 = b.modules()[name]
        naive = torch.einsum("or,rk->ok", ((B1 + B2) / 2).double().flatten(1), ((A1 + A2) / 2).double().flatten(1))
        exact = (reference_delta(a, name) + reference_delta(b, name)).flatten(1) / 2
        num, den = num + float((naive - exact).norm() ** 2), den + float(exact.norm() ** 2)
    assert err.pooled == pytest.approx((num / den) ** 0.5, rel=1e-5)

    copies = average.naive_error([a, a, a])
    assert copies.pooled < 1e-6 and max(copies.layers.values()) < 1e-6
    with pytest.raises(LoraMismatchError, match="equal ranks"):
        average.naive_error(members)  # ranks 4, 8, 2


def test_delta_distance_is_the_pooled_relative_delta_error(members, tmp_path):
    a, b = members[0], members[1]  # ranks 4 and 8, scales 1 and 0.25
    assert average.delta_distance(a, a) == 0.0
    lora.save(tmp_path / "a.safetensors", a)
    assert average.delta_distance(lora.load(tmp_path / "a.safetensors"), a) == 0.0  # the file holds the same LoRA
    assert average.delta_distance(average.exact_average([a, a]), a) < 1e-6  # another rank, the same delta-W
    d = average.delta_distance(a, b)
    assert d > 0.1
    assert d == average.relative_error(lora.module_deltas(a), lora.module_deltas(b)).pooled
    # by hand: ||dW_a - dW_b|| / ||dW_b|| pooled over the layers (b is the reference)
    num = den = 0.0
    for name in a.modules():
        da, db = reference_delta(a, name), reference_delta(b, name)
        num, den = num + float((da - db).norm() ** 2), den + float(db.norm() ** 2)
    assert d == pytest.approx((num / den) ** 0.5, rel=1e-5)
    assert average.delta_distance(b, a) != pytest.approx(d)  # relative to the second one's norm
    fewer = lora.LoraFile({k: v for k, v in a.tensors.items() if "conv1" not in k}, a.config, {})
    with pytest.raises(LoraMismatchError, match="different modules"):
        average.delta_distance(a, fewer)


def test_bad_inputs_are_clear_errors(members):
    with pytest.raises(ValueError, match="at least one"):
        average.exact_average([])
    with pytest.raises(ValueError, match="2 weights for 3"):
        average.exact_average(members, [0.5, 0.5])
    with pytest.raises(ValueError, match="finite"):
        average.exact_average(members[:2], [float("nan"), 1.0])
    for rank in (0, -2, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            average.svd_average(members, rank=rank)
    with pytest.raises(ValueError, match="energy"):
        average.svd_average(members, rank="auto", energy=1.5)
    fewer = lora.LoraFile({k: v for k, v in members[0].tensors.items() if "conv1" not in k}, members[0].config, {})
    with pytest.raises(LoraMismatchError, match="other modules"):
        average.exact_average([members[0], fewer])
    name = next(iter(members[0].modules()))
    key = f"unet.{name}.lora_A.weight"
    wider = lora.LoraFile({**members[0].tensors, key: torch.zeros(4, 99, 3, 3)}, members[0].config, {})
    with pytest.raises(LoraMismatchError, match="differ in shape"):
        average.exact_average([members[0], wider])


# ------------------------------------------------------------------------------------ CLI


def test_cli_average(members, tmp_path, capsys):
    paths = [tmp_path / f"l{i}.safetensors" for i in range(3)]
    for p, m in zip(paths, members):
        lora.save(p, m)
    out = tmp_path / "avg.safetensors"
    args = ["average", *map(str, paths), "--out", str(out)]
    assert cli.main(args + ["--weights", "-0.5,1,0.5"]) == 0, capsys.readouterr().err
    assert "method exact" in capsys.readouterr().out
    deltas = lora.module_deltas(lora.load(out))
    want = lora.module_deltas(average.exact_average(members, [-0.5, 1.0, 0.5]))
    assert all(close(deltas[n], want[n]) for n in want)

    assert cli.main(args) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    assert cli.main(args + ["--rank", "auto", "--energy", "0.95", "--force"]) == 0
    text = capsys.readouterr().out
    assert "energy kept" in text and "auto" in text
    avg = lora.load(out)
    assert avg.meta["method"] == "svd" and float(avg.meta["energy_kept"]) >= 0.95

    same = [str(paths[0]), str(tmp_path / "l0_copy.safetensors")]
    lora.save(same[1], members[0])
    other = tmp_path / "l3.safetensors"
    lora.save(other, random_lora(4, 4, 7))
    assert cli.main(["average", str(paths[0]), str(other), "--out", str(tmp_path / "n.safetensors"), "--compare-naive"]) == 0
    assert "naive average" in capsys.readouterr().out

    bad = {"missing file": ["average", str(tmp_path / "nope.safetensors"), str(paths[0])],
           "rank 0": ["average", *map(str, paths), "--rank", "0"],
           "rank word": ["average", *map(str, paths), "--rank", "many"],
           "weights count": ["average", *map(str, paths), "--weights", "0.5,0.5"],
           "energy on a fixed rank": ["average", *map(str, paths), "--rank", "4", "--energy", "0.9"],
           "energy out of range": ["average", *map(str, paths), "--energy", "1.5"],
           "naive needs equal ranks": ["average", *map(str, paths), "--compare-naive"],
           "other modules": ["average", str(paths[0]), str(tmp_path / "fewer.safetensors")],
           "not safetensors out": ["average", *same]}
    lora.save(tmp_path / "fewer.safetensors",
              lora.LoraFile({k: v for k, v in members[0].tensors.items() if "conv2" not in k}, members[0].config, {}))
    for what, argv in bad.items():
        target = tmp_path / ("bad.pt" if what == "not safetensors out" else "bad.safetensors")
        assert cli.main(argv + ["--out", str(target)]) == 2, what
        assert "difflora: error:" in capsys.readouterr().err, what
        assert not target.exists(), what


def test_cli_pairs_trains_every_pair_and_averages_the_lora2s(tmp_path, capsys):
    out = tmp_path / "pairs"
    tiny = ["--steps", "2", "--batch", "2", "--rank", "2", "--alpha", "2"]
    assert cli.main(["pairs", str(DEFAULT_PAIRS), "--out", str(out), "--axis", "detail", "--limit", "2", *tiny]) == 0, \
        capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    assert [e["dir"] for e in index["pairs"]] == ["pair_000", "pair_001"] and index["axis"] == "detail"
    lora2s = [lora.load(out / d / "lora2.safetensors") for d in ("pair_000", "pair_001")]
    assert all((out / d / "lora1.safetensors").is_file() for d in ("pair_000", "pair_001"))
    assert all(l.meta["stage"] == "2" and l.rank == 2 for l in lora2s)
    avg = lora.load(out / "average.safetensors")
    assert avg.meta["members"].split(",") == [l.digest() for l in lora2s] == index["average"]["members"]
    assert avg.meta["method"] == "exact" and avg.rank == 4
    want = lora.module_deltas(average.exact_average(lora2s))
    got = lora.module_deltas(avg)
    assert all(close(got[n], want[n]) for n in want)
    assert not list(tmp_path.glob(".*partial"))

    bad = {"exists": ["--axis", "detail"],
           "limit 0": ["--axis", "detail", "--limit", "0", "--force"],
           "unknown axis": ["--axis", "shiny", "--force"],
           "several axes": ["--force"],
           "rank-out 0": ["--axis", "detail", "--rank-out", "0", "--force"],
           "train rank 0": ["--axis", "detail", "--rank", "0", "--force"]}
    for what, extra in bad.items():
        assert cli.main(["pairs", str(DEFAULT_PAIRS), "--out", str(out), "--limit", "1", *extra]) == 2, what
        assert "difflora: error:" in capsys.readouterr().err, what
    assert cli.main(["pairs", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "p2")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "p2").exists()
    assert json.loads((out / "index.json").read_text()) == index  # the refused runs left DIR alone


def test_cli_pairs_svd_compresses_the_average(tmp_path, capsys):
    out = tmp_path / "pairs"
    argv = ["pairs", str(DEFAULT_PAIRS), "--out", str(out), "--axis", "detail", "--limit", "2",
            "--steps", "2", "--batch", "2", "--rank", "2", "--rank-out", "auto", "--energy", "0.9"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "energy kept" in capsys.readouterr().out
    avg = lora.load(out / "average.safetensors")
    assert avg.meta["method"] == "svd" and float(avg.meta["energy_kept"]) >= 0.9
    assert max(average.module_ranks(avg).values()) <= 4
