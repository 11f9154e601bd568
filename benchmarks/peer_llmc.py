"""llm-compressor side of ``benchmarks/peers.py``: runs INSIDE the peer venv, never imports quantkit.

    PEER_VENV/bin/python benchmarks/peer_llmc.py --model LLAMA_DIR --calib calib.pt --method gptq \
        --bits 4 --group-size 64 --sym --out dequant.safetensors --probe probe.pt --json row.json

Loads the transformers checkpoint in fp32, runs ``llmcompressor.oneshot`` with the method's recipe on the
given calibration windows (``calib.pt``: int64 [n, seq_len], the very tokens quantkit calibrates on),
then writes every quantized linear's *dequantized* weight (fake-quantized with its own scales and zero
points) to ``--out``, so the caller evaluates them with its one NLL code path. ``--probe`` (int64
[1, T]) is pushed through llm-compressor's own model afterwards and its logits saved, so the caller can
check that the dequantized weights reproduce what llm-compressor computes. The JSON row holds the
times (``quantize_seconds`` = model load + ``oneshot`` + ``save_pretrained(save_compressed=True)``, as
quantkit's time is read + calibrate + quantize + write), the versions, and which modules were quantized; an
exception is recorded in it (type and first line) instead of being raised, for the MoE attempt.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from importlib.metadata import version

import torch


def scheme(bits: int, group_size: int, sym: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=w)}


def recipe(method: str, bits: int, group_size: int, sym: bool):
    """The documented recipes: RTN = QuantizationModifier, GPTQ = GPTQModifier (defaults: static act
    order, dampening 0.01, block 128), AWQ = AWQModifier (defaults: duo scaling, 20-point grid) before
    the quantizer of the method."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    groups = scheme(bits, group_size, sym)
    quant = {"rtn": QuantizationModifier, "gptq": GPTQModifier, "awq": QuantizationModifier,
             "awq+gptq": GPTQModifier}[method](config_groups=groups, ignore=["lm_head"])
    return [AWQModifier(), quant] if method.startswith("awq") else [quant]


QUANT_PARAMS = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")


def dequantized(model) -> dict[str, torch.Tensor]:
    """Every parameter of the model as llm-compressor left it, in fp32: name.weight -> the fake-quantized weight for
    every module llm-compressor attached scales to, and every other parameter as it is now (AWQ folds its smoothing
    scales into the norms before it: the original norms with AWQ's weights give another model)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.utils import align_module_device

    out = {}
    for name, mod in model.named_modules():
        with torch.no_grad(), align_module_device(mod):  # offloaded modules: their parameters onloaded here
            if hasattr(mod, "weight_scale"):
                args = mod.quantization_scheme.weights
                zp = getattr(mod, "weight_zero_point", None)
                if getattr(mod, "weight_g_idx", None) is not None:
                    raise RuntimeError(f"{name}: g_idx (group act order) is not supported here; the recipes use static groups")
                out[f"{name}.weight"] = fake_quantize(mod.weight.float(), mod.weight_scale.float(), zp, args).contiguous()
            for pname, p in mod.named_parameters(recurse=False):
                full = f"{name}.{pname}" if name else pname
                if full not in out and pname not in QUANT_PARAMS and p.is_floating_point():
                    out[full] = p.detach().float().clone().contiguous()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--method", required=True, choices=("rtn", "gptq", "awq", "awq+gptq"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--probe", default=None)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    row = {"method": a.method, "bits": a.bits, "group_size": a.group_size, "symmetric": a.sym,
           "threads": torch.get_num_threads(),
           "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}}
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM

        t_load = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        row["load_seconds"] = time.perf_counter() - t_load
        row["architecture"] = type(model).__name__
        ids = torch.load(a.calib)
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        if not torch.accelerator.is_available():  # 0.14's AWQ pins its CPU activation cache for fast host-to-device
            from llmcompressor.pipelines.cache import IntermediatesCache  # copies; CPU-only torch refuses to pin

            IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # ("Cannot access accelerator device")
            row["patched"] = "IntermediatesCache.pin_memory made a no-op (CPU-only torch cannot pin memory)"
        t0 = time.perf_counter()
        oneshot(model=model, dataset=ds, recipe=recipe(a.method, a.bits, a.group_size, a.sym),
                num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
        row["oneshot_seconds"] = time.perf_counter() - t0
        deq = dequantized(model)  # before saving: save_pretrained compresses the modules in place
        row["quantized_modules"] = sum(1 for _, m in model.named_modules() if hasattr(m, "weight_scale"))
        row["unquantized_linears"] = [n for n, m in model.named_modules()
                                      if isinstance(m, torch.nn.Linear) and not hasattr(m, "weight_scale")]
        row["unquantized_params_3d"] = [n for n, p in model.named_parameters() if p.dim() == 3]
        save_file(deq, a.out)
        if a.probe:
            with torch.no_grad():
                torch.save(model(torch.load(a.probe)).logits.float(), a.probe + ".logits")
        with tempfile.TemporaryDirectory() as d:  # what a user does next: write the compressed checkpoint
            t_save = time.perf_counter()
            model.save_pretrained(d, save_compressed=True)
            row["save_seconds"] = time.perf_counter() - t_save
        row["quantize_seconds"] = row["load_seconds"] + row["oneshot_seconds"] + row["save_seconds"]
        row["ok"] = True
    except Exception as e:  # recorded, not raised: the caller prints it in the table
        row["ok"] = False
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
    with open(a.json, "w") as f:
        json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
