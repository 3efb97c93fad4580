"""Hand-written CPU kernels, compiled on first use with the system C++ compiler against the installed torch.

`gemv` and `grouped_gemv` multiply bf16 weights by a few rows at the speed the weights stream from memory (see
cpu_gemv.cpp): the products of single-token decoding, the experts of a small decode batch, MTP verification.
`attention_forward` / `attention_backward` are training's causal or masked attention in bf16 (cpu_attention.cpp,
AMX tiles through oneDNN's brgemm, masked tiles skipped): the backward 5-14x faster than ATen's flash-attention
backward at training shapes.
`experts_forward` / `experts_backward` are the routed experts of bf16 training (cpu_experts.cpp): per expert, the
weights cast and packed once, every product a brgemm micro-kernel, SwiGLU and the row gathers fused;
`route_topk` the router's group-limited choice and `sort_by_expert` the slots' counting sort by expert.
`linear_weight_grad` is a bf16 linear layer's weight gradient dY^T X in fp32 (cpu_linear.cpp), faster than ATen's
transposed-A matmul at training shapes; `swiglu_forward` / `swiglu_backward` the dense MLPs' SwiGLU in one pass.
`rms_norm_forward` / `rms_norm_backward` are training's RMSNorm in one pass over the rows each way
(cpu_rmsnorm.cpp), where autograd makes ~16 elementwise passes; `cross_entropy_lse` / `cross_entropy_grad` the
loss's, likewise (cpu_cross_entropy.cpp). `adamw_bf16_moments_` is an AdamW step with bf16 moments in one pass
(cpu_adamw.cpp).
The library is built once per (sources, torch, compiler flags) into ~/.cache/dsv3/kernels (or
$DSV3_KERNEL_CACHE) and loaded with `torch.ops.load_library`. The ops, `torch.ops.dsv3.gemv` and
`torch.ops.dsv3.grouped_gemv`, have fake implementations, so torch.compile'd graphs can call them. Everything
falls back to ATen when the CPU lacks AVX512-BF16 (AMX too, for attention and the experts), no compiler is found,
the build fails (one warning), or DSV3_CPU_KERNELS=0.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name(n) for n in (
    "cpu_gemv.cpp", "cpu_attention.cpp", "cpu_rmsnorm.cpp", "cpu_cross_entropy.cpp", "cpu_experts.cpp",
    "cpu_linear.cpp", "cpu_adamw.cpp")]
_HEADERS = [Path(__file__).with_name(n) for n in ("vec.h", "pack.h")]  # included by the training kernels
# -ffp-contract=off: no a * b + c fused behind the code's back, so the kernels' rounding does not change with the
# compiler's inlining choices (an unrelated edit to a shared header moved attention outputs by an ulp)
_FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512bf16", "-ffp-contract=off", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def _build() -> Path:
    """Compile the library unless a matching one is cached; returns its path."""
    from torch.utils.cpp_extension import include_paths, library_paths

    key = hashlib.sha256(b"\0".join([*(s.read_bytes() for s in _SOURCES + _HEADERS), torch.__version__.encode(),
                                     " ".join(_FLAGS).encode(), sys.version.encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("DSV3_KERNEL_CACHE") or Path.home() / ".cache" / "dsv3" / "kernels")
    lib = cache / f"dsv3_cpu-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    libdir = library_paths()[0]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then rename: concurrent builders are safe
        out = Path(tmp) / lib.name
        cmd = [cxx, *_FLAGS, *(f"-I{p}" for p in include_paths()), *map(str, _SOURCES), f"-L{libdir}", "-lc10",
               "-ltorch_cpu", f"-Wl,-rpath,{libdir}", "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{done.stderr[-2000:]}")
        os.replace(out, lib)
    return lib


def available() -> bool:
    """Whether the torch.ops.dsv3 kernels are loaded (building them on the first call)."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" not in _state:
            ok = os.environ.get("DSV3_CPU_KERNELS", "1") != "0" and sys.platform == "linux" and _cpu_has_avx512_bf16()
            if ok:
                try:
                    torch.ops.load_library(str(_build()))
                    torch.library.register_fake("dsv3::grouped_gemv")(
                        lambda x, w, offs: x.new_empty(x.shape[0], w.shape[1]))
                    torch.library.register_fake("dsv3::gemv")(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
                except Exception as e:  # a missing compiler or headers must not stop the model from running
                    warnings.warn(f"dsv3: CPU kernels unavailable, using ATen ({e})", stacklevel=2)
                    ok = False
            _state["ok"] = ok
    return _state["ok"]


def gemv_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether gemv / grouped_gemv can compute this product: bf16 on CPU, no gradient needed (it has no backward)."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and available())


def grouped_gemv(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16, w [E, N, K] bf16, offs [E] cumulative rows per group (ends at M) -> [M, N] bf16:
    rows of group e times w[e]^T, products summed in fp32."""
    return torch.ops.dsv3.grouped_gemv(x, w, offs)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16, w [N, K] bf16 -> x w^T [M, N] bf16, products summed in fp32."""
    return torch.ops.dsv3.gemv(x, w)


def attention_ok(q: torch.Tensor, v: torch.Tensor, rope: int = 0, interleave: bool = True) -> bool:
    """Whether `attention_forward` / `attention_backward` take attention over q [B, H, T, Dq], v [B, H, T, Dv],
    with the last `rope` dims of q and k rotated inside: bf16 on a CPU with AMX, head dims multiples of 16
    (rope dims of 32 when not interleaved)."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and (q.shape[-1] - rope) % 16 == 0
            and rope % (16 if interleave else 32) == 0 and v.shape[-1] % 16 == 0 and amx())


def amx() -> bool:
    """Whether the kernels are loaded and oneDNN's brgemm runs bf16 here (AMX): bf16 training's kernels run."""
    if not available():
        return False
    if "amx" not in _state:
        _state["amx"] = bool(torch.ops.dsv3.attention_supported())
    return _state["amx"]


def attention_forward(q, k, v, mask, scale: float, rope=None):
    """(softmax(scale q k^T) v [B, H, T, Dv] bf16, log-sum-exp [B, H, T] fp32): causal when mask is None, else
    mask (bool, broadcastable to [B, H, T, T], True = may attend). With rope = (k_pe [B, T, Dr], cos, sin
    [1 or B, T, Dr / 2], interleave), the keys are [k, k_pe] (k_pe shared by the heads) and the last Dr dims of
    q and of the keys are rotated first (as `dsv3.model.layers.apply_rotary`)."""
    k_pe, cos, sin, interleave = rope or (None, None, None, True)
    return torch.ops.dsv3.attention_forward(q, k, v, k_pe, cos, sin, interleave, mask, mask is None, scale)


def attention_backward(grad_out, q, k, v, out, lse, mask, scale: float, rope=None):
    """Gradients of `attention_forward`'s output from its out and lse: dq (of q before rotation), dkv
    [B, T, H, Dk + Dv] (dk then dv per head) and dk_pe [B, T, Dr] (k_pe's gradient, the heads' summed in fp32 in
    head order; empty without rope)."""
    k_pe, cos, sin, interleave = rope or (None, None, None, True)
    return torch.ops.dsv3.attention_backward(grad_out, q, k, v, k_pe, cos, sin, interleave, out, lse, mask,
                                             mask is None, scale)


def rms_norm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the fused RMSNorm can train this norm: fp32 or bf16 x on CPU, fp32 weight, dim a multiple of 16."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and w.dtype == torch.float32
            and x.shape[-1] % 16 == 0 and available())


def rms_norm_forward(x: torch.Tensor, w: torch.Tensor, eps: float, bf16_out: bool = False):
    """x [R, D] (rows contiguous), w [D] fp32 -> (w * x.dtype(x * rsqrt(mean(x^2) + eps)) [R, D] fp32, or rounded
    to bf16 with bf16_out; rsqrt [R])."""
    return torch.ops.dsv3.rms_norm_forward(x, w, eps, bf16_out)


def add_rms_norm_forward(h: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, bf16_out: bool = False):
    """h [R, D] fp32, r [R, D] fp32 or bf16 (contiguous) -> (s = h + r fp32, then as rms_norm_forward(s))."""
    return torch.ops.dsv3.add_rms_norm_forward(h, r, w, eps, bf16_out)


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor,
                      dres: torch.Tensor | None = None, bf16_copy: bool = False, out: torch.Tensor | None = None):
    """(dx [R, D] in x's dtype, dw [D] fp32) for the forward above; dy fp32 or bf16. dres [R, D] fp32 (for an fp32
    x): a gradient reaching x by another way, added to dx. With bf16_copy (fp32 x), (dx, dw, dx rounded to bf16).
    With out ([R, D] in x's dtype, rows contiguous and aligned to 16 elements, e.g. columns of a wider buffer), dx
    is written there (and returned)."""
    dx, dw, dx_bf16 = torch.ops.dsv3.rms_norm_backward(dy, x, w, rstd, dres, bf16_copy, out)
    return (dx, dw, dx_bf16) if bf16_copy else (dx, dw)


def cross_entropy_ok(logits: torch.Tensor) -> bool:
    """Whether the CPU cross-entropy kernels take logits [N, V]: fp32 or bf16 on CPU, rows contiguous."""
    return (logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16)
            and logits.stride(-1) == 1 and available())


def cross_entropy_lse(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> the log-sum-exp of each row [N], fp32."""
    return torch.ops.dsv3.cross_entropy_lse(logits)


def cross_entropy_grad(logits, lse, target, scale, inplace: bool = False) -> torch.Tensor:
    """d/d logits of sum_i scale[i] (lse[i] - logits[i, target[i]]): (softmax - one-hot) x scale, in the logits'
    dtype (the fp32 value rounded once); with inplace, written over the logits (returned)."""
    if inplace:
        torch.ops.dsv3.cross_entropy_grad_(logits, lse, target, scale)
        torch.autograd.graph.increment_version(logits)  # as ATen's in-place ops: autograd then sees the change
        return logits
    return torch.ops.dsv3.cross_entropy_grad(logits, lse, target, scale)


def route_topk_ok(choice: torch.Tensor, k: int, n_group: int) -> bool:
    """Whether `route_topk` takes this choice of k experts in n_group groups: on CPU, up to 16 of each, eager."""
    return (choice.device.type == "cpu" and k <= 16 and n_group <= 16 and not torch.compiler.is_compiling()
            and available())


def route_topk(choice: torch.Tensor, k: int, n_group: int, topk_group: int, top2: bool) -> torch.Tensor:
    """DeepSeek-V3's group-limited expert choice from choice [N, E] (scores + correction bias): groups scored by the
    sum of their two best (top2) or their best, the topk_group best groups kept, then the k best of their experts
    -> idx [N, k] int64, best first (ties: the lower index)."""
    return torch.ops.dsv3.route_topk(choice.float(), k, n_group, topk_group, top2)


def sort_by_expert_ok(idx: torch.Tensor) -> bool:
    """Whether `sort_by_expert` takes these expert indices: on CPU, eager."""
    return idx.device.type == "cpu" and not torch.compiler.is_compiling() and available()


def sort_by_expert(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx [M] int64 -> (the positions sorted by expert, stably: idx.argsort(stable=True); the count per expert
    [n_experts]), by a counting sort."""
    return torch.ops.dsv3.sort_by_expert(idx.contiguous(), n_experts)


def experts_ok(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether `experts_forward` / `experts_backward` take these experts: CPU with AMX, fp32 or bf16 x, contiguous
    fp32 weights, hidden and expert sizes multiples of 32."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and gate_up.dtype == torch.float32
            and down.dtype == torch.float32 and gate_up.is_contiguous() and down.is_contiguous()
            and x.shape[-1] % 32 == 0 and down.shape[-1] % 32 == 0 and amx())


def experts_forward(x, order, k: int, counts: list[int], gate_up, down, weights=None, add=None):
    """SwiGLU experts on x [R, H]: order [M] int64 puts the (token, choice) slots in expert order (token = slot // k;
    None: x's rows are already in expert order, k = 1), counts [E] rows per expert, fp32 gate_up [E, 2I, H] and
    down [E, H, I] (cast to bf16, products summed in fp32), router weights [R, k] fp32 (with order) or None.
    Returns (y [M, H] bf16 by slot; for the backward the gate/up activations h, bf16; with weights, out [R, H] =
    sum_j weights[:, j] y[slot (t, j)] (+ add, bf16 [R, H], after that sum) in fp32, else an empty tensor)."""
    return torch.ops.dsv3.experts_forward(x, order, k, counts, gate_up, down, weights, add)


def experts_backward(dy, order, k: int, counts: list[int], x, h, gate_up, down, weights=None, bf16_dx=False,
                     dx_add=None):
    """Gradients for the forward above (x: its x in bf16, h: its h) from dy, the gradient of out [R, H] (with
    weights) or of y [M, H]: (dx: [R, H] with weights, the k slots' sum (+ dx_add, bf16 [R, H]) in fp32, or rounded
    to bf16 with bf16_dx, else [M, H] bf16 by row; dgate_up, ddown fp32; dweights [R, k] fp32 with weights, else
    empty)."""
    return torch.ops.dsv3.experts_backward(dy, order, k, counts, x, h, gate_up, down, weights, bf16_dx, dx_add)


def linear_weight_grad_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear_weight_grad` can give the gradient of weight [N, K] in a product with x [.., K]: on a CPU
    with AMX, N and K multiples of 32."""
    return x.device.type == "cpu" and weight.shape[0] % 32 == 0 and weight.shape[1] % 32 == 0 and amx()


def linear_weight_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy [T, N], x [T, K] bf16 (rows contiguous) -> dy^T x [N, K] fp32 (products summed in fp32, rounded once)."""
    return torch.ops.dsv3.linear_weight_grad(dy, x)


def swiglu_forward(gu: torch.Tensor) -> torch.Tensor:
    """gu [T, 2I] bf16 (gate values, then up values) -> silu(gate) * up [T, I] bf16, rounded as autocast's ops round."""
    return torch.ops.dsv3.swiglu_forward(gu)


def swiglu_backward(da: torch.Tensor, gu: torch.Tensor) -> torch.Tensor:
    """The gradient [T, 2I] bf16 of gu for `swiglu_forward` from da [T, I] bf16."""
    return torch.ops.dsv3.swiglu_backward(da, gu)


def adamw_bf16_moments_ok(param, grad, exp_avg, exp_avg_sq) -> bool:
    """Whether `adamw_bf16_moments_` can step this parameter: fp32 parameter and gradient, bf16 moments, all
    contiguous, on CPU."""
    tensors = (param, grad, exp_avg, exp_avg_sq)
    return (param.device.type == "cpu" and param.dtype == grad.dtype == torch.float32
            and exp_avg.dtype == exp_avg_sq.dtype == torch.bfloat16 and all(t.is_contiguous() for t in tensors)
            and available())


def adamw_bf16_moments_(param, grad, exp_avg, exp_avg_sq, lr: float, beta1: float, beta2: float, eps: float,
                        weight_decay: float, step: int) -> None:
    """One AdamW step of param (fp32) in place, its moments exp_avg and exp_avg_sq (bf16, contiguous) updated in
    fp32 and rounded back to bf16: torch.optim.AdamW's arithmetic, in one pass."""
    torch.ops.dsv3.adamw_bf16_moments_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step)
