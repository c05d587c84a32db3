"""The 8-bit base: real bitsandbytes Linear8bitLt layers, 0.25x the fp32 bytes, frozen in training."""

import bitsandbytes as bnb
import torch
from torch import nn

from difflora_kit import lora, quant
from difflora_kit.config import TrainConfig
from difflora_kit.pair import prepare_base


def test_every_linear_becomes_int8_at_a_quarter_of_its_bytes():
    fp = prepare_base("toy", TrainConfig(eight_bit=False)).unet
    linears = {n: m for n, m in fp.named_modules() if type(m) is nn.Linear}
    fp32_bytes = sum(m.weight.numel() * 4 for m in linears.values())
    rows = sum(m.out_features for m in linears.values())
    q = prepare_base("toy", TrainConfig(eight_bit=True)).unet
    assert not [n for n, m in q.named_modules() if type(m) is nn.Linear]
    assert all(isinstance(dict(q.named_modules())[n], bnb.nn.Linear8bitLt) for n in linears)
    assert quant.weight_bytes(q)["int8_linear"] == fp32_bytes // 4 + 4 * rows
    for n, m in linears.items():
        w8 = quant.dequantized_weight(dict(q.named_modules())[n])
        err = (w8 - m.weight).norm() / m.weight.norm()
        assert err < 0.02, (n, float(err))


def test_quantized_weight_equals_bitsandbytes_quantizer_of_the_fused_weight(tiny_pair_loras):
    result, _, _ = tiny_pair_loras
    fp = prepare_base("toy", TrainConfig(eight_bit=False)).unet
    lora.fuse_into(fp, result.lora1)
    q = prepare_base("toy", TrainConfig(eight_bit=True), preset=result.lora1).unet
    name = next(n for n in result.lora1.modules() if n.endswith("to_q"))
    CB, SCB = quant.int8_state(dict(q.named_modules())[name])
    # the default preset mode fuses and quantizes in one pass (kernels.merge_quantize), from fp32
    # (bitsandbytes' Int8Params would round the weight to fp16 first)
    CB_ref, SCB_ref, _ = bnb.functional.int8_vectorwise_quant(dict(fp.named_modules())[name].weight.data)
    assert (CB.int() - CB_ref.int()).abs().max() <= 1
    torch.testing.assert_close(SCB, SCB_ref)


def test_training_leaves_the_int8_base_untouched_and_moves_the_lora(tiny_pair_loras):
    result, row, _ = tiny_pair_loras
    # the fixture trained on an 8-bit base: its LoRA B matrices moved away from their zero init
    assert all(float(B.abs().max()) > 0 for _, B in result.lora1.modules().values())
    from difflora_kit.images import load_image
    from difflora_kit.train import train_lora

    backend = prepare_base("toy", TrainConfig())
    layer = next(m for m in backend.unet.modules() if isinstance(m, bnb.nn.Linear8bitLt))
    before = [t.clone() for t in quant.int8_state(layer)]
    train_lora(backend, load_image(row["image1"]), row["prompt"], TrainConfig(steps=3), progress=False)
    after = quant.int8_state(layer)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_int8_linear_computes_the_same_in_train_and_eval_mode():
    """bitsandbytes on CPU quantizes activations in eval mode only; the kit's layer never does, so a
    model sampled after training (eval) is the model that was trained."""
    from difflora_kit.quant import Int8Linear, dequantized_weight, quantize_linears

    torch.manual_seed(0)
    net = quantize_linears(torch.nn.Sequential(torch.nn.Linear(64, 48)))
    layer, x = net[0], torch.randn(5, 64) * 3
    assert isinstance(layer, Int8Linear)
    want = x @ dequantized_weight(layer).T + layer.bias
    outs = [net.train(mode)(x) for mode in (True, False, True)]
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_int8_linear_keeps_nothing_of_its_input_and_matches_bitsandbytes():
    """Same output and input gradient as bitsandbytes' Linear8bitLt (bit for bit on CPU), but the
    input is not held for the backward pass (bitsandbytes holds it; a frozen weight never needs it)."""
    import weakref

    from difflora_kit.quant import quantize_linears

    torch.manual_seed(0)
    ours = quantize_linears(torch.nn.Sequential(torch.nn.Linear(64, 48)))[0]
    theirs = bitsandbytes_twin(ours)
    x = (torch.randn(2, 7, 64) * 3).requires_grad_(True)
    grad = torch.randn(2, 7, 48)

    def input_kept(layer) -> bool:
        """Does the graph of layer(h) keep h alive once nothing else refers to it?"""
        h = x * 1  # a fresh tensor that needs a gradient
        ref = weakref.ref(h)
        y = layer(h)
        del h
        kept = ref() is not None
        del y
        return kept

    assert not input_kept(ours)
    assert input_kept(theirs.train())  # bitsandbytes keeps it (ctx.A): the difference this layer makes
    y = ours(x)
    (gx,) = torch.autograd.grad(y, x, grad)
    y_ref = theirs.train()(x)
    (gx_ref,) = torch.autograd.grad(y_ref, x, grad)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


def bitsandbytes_twin(ours):
    """bitsandbytes' own Linear8bitLt holding the same int8 weight, scales and bias as the kit's layer."""
    import bitsandbytes as bnb

    theirs = bnb.nn.Linear8bitLt(ours.in_features, ours.out_features, has_fp16_weights=False, threshold=0.0)
    theirs.weight = bnb.nn.Int8Params(ours.weight.data.clone(), requires_grad=False, has_fp16_weights=False,
                                      CB=ours.weight.CB.clone(), SCB=ours.weight.SCB.clone())
    theirs.bias = torch.nn.Parameter(ours.bias.detach().clone(), requires_grad=False)
    return theirs

