"""Dequant-GEMM kernels (Triton) and their pure-torch twins.

``reference``  weight descriptors (``IntWeight``, ``Code2Weight``) and the torch twins: dequantize, then matmul
``dense``      Triton int2/4/8 grouped dequant-GEMM (needs triton)
``code2``      Triton 2-bit-code (WINT2) dequant-GEMM (needs triton)
``fused_moe``  Triton fused MoE: align -> gate_up (+SiLU*up) -> down (x routing weight) -> combine (needs triton)
``dispatch``   the backend switch (``auto`` | ``triton`` | ``torch``) and the entry points the modules call

Only ``dispatch`` and ``reference`` are imported eagerly: the package imports where triton is absent.
"""
