"""The "cuda" backend of the multi-LoRA op: csrc/cuda/multi_lora.cu through fastadapters._C (no Triton JIT).

The base GEMMs run on cuBLAS; then one shrink launch (x read once per token for every member, fp32 t) and
one expand launch add each token's own adapter delta into the base outputs in place. Built only where
torch is a CUDA build and a CUDA toolkit exists. Implements the interface of fastadapters/ops/multi_lora.py
(the same torch.ops.fastadapters_C.multi_lora_forward as the cpu backend, dispatched on the CUDA key).
"""

from fastadapters.ops._cpu_multi_lora import forward, prepare  # noqa: F401
