"""Compile every Triton kernel variant quantkit launches at ERNIE-4.5-21B-A3B shapes for a GPU target (default
sm_90: H100/H200) on a machine without a GPU, and report what the compiler made of each: registers, spills,
shared memory, the occupancy they allow, and for each launch its programs and the waves they fill.

    python benchmarks/kernel_compile.py [--arch 90] [--sms 132] [--m 1,4,16,64,256,2048] [--quick] [--json FILE]

How: Triton's own pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> ptxas cubin) runs for the named target through
a stand-in driver that only names it; each kernel's launch ``kernel[grid](...)`` is replaced by its ``warmup``
(compile, no launch), called by quantkit's real launch code with CPU tensors (same signature and 16-byte
alignment as CUDA ones), so the variants and tile configs are exactly those a GPU run at these shapes would
compile. Registers, spills (local memory) and static shared memory come from the cubin (``cuobjdump
-res-usage``, shipped with Triton), dynamic shared memory from the kernel's metadata. The occupancy arithmetic
(64K registers in 256-register warp units, 228 KB shared memory with 1 KB reserved per block, 64 warps and 32
blocks per SM) is ours. Exit status 1 when a variant fails to compile, spills, or needs more shared memory than
a block may have (227 KB): a check that runs in CI, before any GPU time is spent.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, whatever the caller's environment says
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_common as gc  # noqa: E402
from kernels import DENSE, MOE  # noqa: E402


def _routers() -> dict:
    from quantkit.model.routers import RouterSpec

    # each family's router as its Hub config has it (expert counts and top-k of the released models)
    return {"ernie": RouterSpec(top_k=MOE["top_k"], num_experts=MOE["experts"], has_bias=True, norm_min=1e-12),
            "mixtral": RouterSpec(top_k=2, num_experts=8),
            "qwen3-moe": RouterSpec(top_k=8, num_experts=128),
            "olmoe": RouterSpec(top_k=8, num_experts=64, renormalize=False),
            "glm-4.5": RouterSpec(top_k=8, num_experts=160, scoring="sigmoid", has_bias=True, routed_scaling_factor=2.5),
            "deepseek-v3": RouterSpec(top_k=8, num_experts=256, scoring="sigmoid", has_bias=True, n_group=8, topk_group=4,
                                      routed_scaling_factor=2.5)}


ROUTERS = _routers()
SMEM_PER_SM, SMEM_PER_BLOCK, SMEM_RESERVED = 228 * 1024, 227 * 1024, 1024
REGS_PER_SM, REG_UNIT, WARPS_PER_SM, BLOCKS_PER_SM = 65536, 256, 64, 32


class TargetOnly:
    """What ``JITFunction.run`` asks the active driver before compiling: the target (and a device/stream id)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class CompileOnly:
    """Stands in for a kernel at its launch site: ``kernel[grid](*args)`` compiles (warmup) and records."""

    def __init__(self, kernel, log: list, context: dict):
        self.kernel, self.log, self.context = kernel, log, context

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            try:
                compiled, error = self.kernel.warmup(*args, grid=grid, **kwargs), None
            except Exception as e:  # noqa: BLE001 - reported per variant, the run goes on
                compiled, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            bound = dict(zip(self.kernel.arg_names, args)) | kwargs
            if self.kernel.fn.__name__ == "_align_kernel":  # the blocks the MoE launches see come from the twin
                from quantkit.kernels import reference

                rows, block_expert = reference.align(args[0], args[4], bound["BM"], args[5])
                args[1].copy_(rows)
                args[2].copy_(block_expert)
            self.log.append({**self.context, "kernel": self.kernel.fn.__name__, "grid": tuple(grid), "args": bound,
                             "compiled": compiled, "error": error})
        return launch


def resources(compiled) -> dict:
    """Registers, local (spill) bytes and static shared memory from the cubin, plus the launch's dynamic smem."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    md = compiled.metadata
    return {"regs": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]), "stack_bytes": int(fields["STACK"]),
            "smem_static": int(fields["SHARED"]), "smem_dynamic": int(md.shared), "num_warps": md.num_warps,
            "num_stages": md.num_stages}


def occupancy(res: dict) -> dict:
    warps = res["num_warps"]
    per_warp = -(-res["regs"] * 32 // REG_UNIT) * REG_UNIT
    smem = res["smem_static"] + res["smem_dynamic"]
    limits = {"regs": (REGS_PER_SM // per_warp) // warps, "smem": SMEM_PER_SM // (smem + SMEM_RESERVED),
              "warps": WARPS_PER_SM // warps, "blocks": BLOCKS_PER_SM}
    blocks = min(limits.values())
    return {"smem_bytes": smem, "blocks_per_sm": blocks, "limited_by": min(limits, key=limits.get),
            "warps_per_sm": blocks * warps}


def launch_variants(ms: list[int], quick: bool) -> list[dict]:
    """Run quantkit's launch code for every (shape, format, M) of the benchmarks; kernels only compile."""
    import torch

    from quantkit.kernels import dense, fused_moe, pointwise, routing
    from quantkit.kernels.code2 import code2_linear
    from quantkit.kernels.trellis import trellis_linear, trellis_moe

    log: list[dict] = []
    context: dict = {}
    for mod, name in ((dense, "_linear_kernel"), (fused_moe, "_moe_kernel"), (fused_moe, "_combine_kernel"),
                      (fused_moe, "_align_kernel"), (routing, "_route_kernel"), (pointwise, "_rms_norm_kernel"),
                      (pointwise, "_rope_kernel")):
        setattr(mod, name, CompileOnly(getattr(mod, name), log, context))
    bf, fp = torch.bfloat16, torch.float16
    dev = "cpu"
    dense_formats = {"w4g128": (lambda n, k: gc.int_weight((), n, k, dev), bf),
                     "w2code": (lambda n, k: gc.code2_weight((), n, k, dev), bf),
                     "w2trellis": (lambda n, k: gc.trellis_weight((), n, k, dev), bf)}
    extra = {"w4g128-asym fp16": (lambda n, k: gc.int_weight((), n, k, dev, asym=True), fp),
             "w8 channel": (lambda n, k: gc.int_weight((), n, k, dev, bits=8, group=k), bf),
             "w2g64-asym": (lambda n, k: gc.int_weight((), n, k, dev, bits=2, group=64, asym=True), bf)}
    shapes = {"q_proj": DENSE["q_proj"]} if quick else DENSE
    for name, (n, k) in shapes.items():
        for fmt, (make, dtype) in (dense_formats | (extra if name == "q_proj" else {})).items():
            w = make(n, k)
            for m in ms:
                context.update(layer=name, format=fmt, m=m, n=n, k=k)
                op = {"w2code": code2_linear, "w2trellis": trellis_linear}.get(fmt, dense.int_linear)
                op(torch.zeros(m, k, dtype=dtype), w)
    n, k = DENSE["shared gate/up"]
    for fmt, (make, dtype) in dense_formats.items():  # the SwiGLU's gate and up in one launch (shared experts)
        g, u = make(n, k), make(n, k)
        for m in ms:
            context.update(layer="shared gate+up", format=fmt, m=m, n=n, k=k)
            if dense.gate_up(torch.zeros(m, k, dtype=dtype), g, u) is None:  # trellis: two launches (SiLU after H)
                for w in (g, u):
                    trellis_linear(torch.zeros(m, k, dtype=dtype), w)
    e, top_k, hdim, inter = MOE["experts"], MOE["top_k"], MOE["hidden"], MOE["inter"]
    for m in ms:  # the attention block's RMSNorm and the RoPE of q (20 heads) and k (4), head dim 128
        context.update(layer="norm + rope", format="bf16", m=m, n=None, k=None)
        pointwise.rms_norm(torch.zeros(m, hdim, dtype=bf), torch.ones(hdim, dtype=bf), 1e-5)
        cos = torch.zeros(m, 128)
        for heads in (20, 4):
            pointwise.rope(torch.zeros(1, m, heads, 128, dtype=bf).transpose(1, 2), cos, cos)
    for name, style, d, r in (("rope rotate-half (Qwen, Mixtral)", "half", 128, 128),
                              ("rope partial (GLM-4.5)", "half", 128, 64),
                              ("rope MLA rope part (DeepSeek-V3)", "interleaved", 64, 64)):
        for m in ms:
            context.update(layer=name, format="bf16", m=m, n=None, k=None)
            pointwise.rope(torch.zeros(1, m, 8, d, dtype=bf).transpose(1, 2), torch.zeros(m, r), torch.zeros(m, r),
                           style=style, rotary_dim=r)
    moe_formats = {"w4g128": lambda n, k: gc.int_weight((e,), n, k, dev),
                   "w2code": lambda n, k: gc.code2_weight((e,), n, k, dev),
                   "w2trellis": lambda n, k: gc.trellis_weight((e,), n, k, dev)}
    if not quick:
        moe_formats["w4g128-asym"] = lambda n, k: gc.int_weight((e,), n, k, dev, asym=True)
    gen = torch.Generator().manual_seed(0)
    for fmt, make in moe_formats.items():
        ws = (make(inter, hdim), make(inter, hdim), make(hdim, inter))
        for m in ms:
            ids = torch.rand(m, e, generator=gen).argsort(1)[:, :top_k]
            weights = torch.full((m, top_k), 1 / top_k)
            context.update(layer=f"MoE E{e} top{top_k}", format=fmt, m=m, n=None, k=None)
            x = torch.zeros(m, hdim, dtype=bf)
            if fmt == "w4g128":  # the routing kernel does not depend on the experts' format
                routing.route(x, torch.zeros(e, hdim), torch.zeros(1, e), ROUTERS["ernie"])
            moe = trellis_moe if fmt == "w2trellis" else fused_moe.fused_moe
            moe(x, ids, weights, *ws, add=torch.zeros(m, hdim, dtype=bf))  # + the shared experts
    for name, spec in ROUTERS.items():  # every family's router variant (a constexpr specialisation) at H = 2560
        if name == "ernie":
            continue
        for m in ms:
            context.update(layer=f"router {name}", format="fp32", m=m, n=None, k=None)
            routing.route(torch.zeros(m, hdim, dtype=bf), torch.zeros(spec.num_experts, hdim),
                          torch.zeros(spec.num_experts), spec)
    return log


def live_programs(rec: dict) -> int:
    """Programs that do work: all of a dense launch; for a MoE launch the blocks that hold pairs (the grid is
    sized for the worst case and the others exit at once)."""
    total = 1
    for g in rec["grid"]:
        total *= g
    if rec["kernel"] != "_moe_kernel":
        return total
    a = rec["args"]
    live_blocks = int((a["block_expert_ptr"] < a["E"]).sum())
    return live_blocks * (total // a["block_expert_ptr"].numel())


def describe(rec: dict) -> str:
    a = rec["args"]
    if rec["kernel"] == "_route_kernel":
        groups = f" groups{a['TOPK_GROUP']}/{a['N_GROUP']}" if a["N_GROUP"] > 1 else ""
        return (f"bt{a['BT']} be{a['BE']} bh{a['BH']} split{a['SPLIT']} top{a['TOP_K']}"
                f" {'sigmoid' if a['SIGMOID'] else 'softmax'}{' +bias' if a['HAS_BIAS'] else ''}"
                f" norm-{('none', 'sum', 'clamp')[a['NORM']]}{groups}{' scaled' if a['SCALE'] else ''} w{a['num_warps']}")
    if rec["kernel"] == "_rms_norm_kernel":
        return f"bh{a['BH']} w{a['num_warps']}"
    if rec["kernel"] == "_rope_kernel":
        return (f"{'rotate-half' if a['ROTATE_HALF'] else 'interleaved'} half{a['HALF']}"
                f"{' pass' + str(a['PASS']) if a['PASS'] else ''} w{a['num_warps']}")
    if rec["kernel"] == "_align_kernel":
        return f"bm{a['BM']} be{a['BE']} ch{a['CH']} w{a['num_warps']}"
    if rec["kernel"] == "_combine_kernel":
        return f"bh{a['BH']} slots{a['S']}{' +add' if a['HAS_ADD'] else ''} w{a['num_warps']}"
    parts = [f"bm{a['BM']} bn{a['BN']} bk{a['BK']}"]
    if a.get("SPLIT_K", 1) > 1:
        parts.append(f"split{a['SPLIT_K']}")
    if rec["kernel"] == "_linear_kernel" and a["GATE_UP"]:
        parts.append("gate_up")
    if a["SCALE_IN_TILE"]:
        parts.append("scale-in-tile")
    if rec["kernel"] == "_moe_kernel":
        parts.append(("gate_up" if a["GATE_UP"] else "down") + (" pair-blocks" if a["PAIR_BLOCKS"] else ""))
    parts.append(f"w{a['num_warps']}s{a['num_stages']}")
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    ap.add_argument("--sms", type=int, default=132, help="SMs the tile heuristics assume (H100 SXM/H200: 132)")
    ap.add_argument("--m", default="1,4,16,64,256,2048", help="tokens per step, comma-separated")
    ap.add_argument("--quick", action="store_true", help="q_proj, shared gate+up and the MoE layer only, M in {1, 16, 2048} (the CI check)")
    ap.add_argument("--json", default=None, help="output (default benchmarks/results/kernel_compile_sm<arch>_triton<v>.json)")
    args = ap.parse_args()
    import triton
    from triton.runtime.driver import driver

    from quantkit.kernels import dispatch

    driver.set_active(TargetOnly(args.arch))
    dispatch.sm_count = lambda device: args.sms  # the tile heuristics see the target, not this machine
    ms = [1, 16, 2048] if args.quick else [int(v) for v in args.m.split(",")]
    log = launch_variants(ms, args.quick)

    variants: dict[str, dict] = {}
    launches = []
    for rec in log:
        row = {k: rec[k] for k in ("layer", "format", "m", "kernel", "error")} | {"config": describe(rec)}
        if rec["compiled"] is not None:
            key = rec["compiled"].hash
            if key not in variants:
                res = resources(rec["compiled"])
                variants[key] = {"kernel": rec["kernel"], "config": row["config"], "first_use": f"{rec['layer']} {rec['format']}",
                                 **res, **occupancy(res)}
            v = variants[key]
            programs = live_programs(rec)
            row |= {"variant": key[:12], "programs": programs, "blocks_per_sm": v["blocks_per_sm"],
                    "waves": programs / (args.sms * v["blocks_per_sm"])}
        launches.append(row)
    problems = [f"{r['layer']} {r['format']} M={r['m']}: {r['error']}" for r in launches if r["error"]]
    for v in variants.values():
        if v["local_bytes"] or v["stack_bytes"]:
            problems.append(f"{v['kernel']} {v['config']}: spills ({v['local_bytes']} B local, {v['stack_bytes']} B stack)")
        if v["smem_bytes"] > SMEM_PER_BLOCK:
            problems.append(f"{v['kernel']} {v['config']}: {v['smem_bytes']} B shared memory > {SMEM_PER_BLOCK}")

    print(f"sm_{args.arch}, {args.sms} SMs assumed, triton {triton.__version__}: {len(variants)} variants from "
          f"{len(launches)} launches")
    vcols = [("kernel", "kernel", ""), ("config", "config", ""), ("regs", "regs", "d"), ("local_bytes", "spill B", "d"),
             ("smem_bytes", "smem B", "d"), ("blocks_per_sm", "blk/SM", "d"), ("limited_by", "limit", ""),
             ("first_use", "first used by", "")]
    print(gc.table(list(variants.values()), vcols))
    lcols = [("layer", "layer", ""), ("format", "format", ""), ("m", "M", "d"), ("config", "config", ""),
             ("programs", "programs", "d"), ("waves", "waves", ".2f"), ("error", "error", "")]
    print()
    print(gc.table(launches, lcols))
    name = f"kernel_compile_sm{args.arch}_triton{triton.__version__}.json"
    info = {"arch": args.arch, "sms": args.sms, "triton": triton.__version__, "quick": args.quick, "ms": ms}
    out = gc.write_json(args.json, name, {"info": info, "variants": variants, "launches": launches, "problems": problems})
    print(f"wrote {out}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
