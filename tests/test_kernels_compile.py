"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU, through Triton's real compiler
pipeline and ptxas, at ERNIE-21B shapes (``benchmarks/kernel_compile.py --quick``): every variant quantkit
launches compiles, none spills registers, none asks for more shared memory than a block may have, and none is
at the 255-register cap (a sign of a layout that replicates data across threads)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _nvidia_toolchain() -> bool:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


@pytest.mark.skipif(not _nvidia_toolchain(), reason="needs triton with its NVIDIA backend (ptxas, cuobjdump)")
def test_kernels_compile_for_sm90(tmp_path):
    out = tmp_path / "compile.json"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_compile.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["problems"] == []
    launches, variants = report["launches"], report["variants"].values()
    assert all(r["error"] is None and r["programs"] > 0 for r in launches)
    # both kernels, both weight kinds, the decode (split-K) and the prefill (scale-in-tile) variants
    seen = {(r["kernel"], r["format"], r["m"]) for r in launches}
    for kernel in ("_linear_kernel", "_moe_kernel"):
        for fmt in ("w4g128", "w2code"):
            assert {(kernel, fmt, 1), (kernel, fmt, 2048)} <= seen
    kernels = {r["kernel"] for r in launches}
    assert {"_route_kernel", "_combine_kernel", "_align_kernel"} <= kernels
    configs = {v["config"] for v in variants}
    assert any("split" in c for c in configs) and any("scale-in-tile" in c for c in configs)
    # every family's router variant and the RoPE variants (rotate-half, partial) are compiled and checked too
    routers = {r["layer"] for r in launches if r["kernel"] == "_route_kernel"}
    assert {f"router {n}" for n in ("mixtral", "qwen3-moe", "olmoe", "glm-4.5", "deepseek-v3")} <= routers
    assert any("sigmoid +bias" in c and "groups4/8 scaled" in c for c in configs)
    assert any("norm-clamp" in c for c in configs) and any("norm-none" in c for c in configs)
    assert any(c.startswith("rotate-half") and "pass" in c for c in configs)
    for v in variants:
        assert v["local_bytes"] == 0 and v["stack_bytes"] == 0
        assert 0 < v["regs"] < 255 and v["blocks_per_sm"] >= 1, v
