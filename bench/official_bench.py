"""Times the official PyTorch VAR (FoundationVision/VAR) on the shapes that bench_train/bench_sample use.

Run with a Python that has torch (never varjax's environment), pointing at a checkout of the official code:

    git clone https://github.com/FoundationVision/VAR /path/to/VAR
    python -m venv /path/to/torchenv && /path/to/torchenv/bin/pip install torch
    /path/to/torchenv/bin/python bench/official_bench.py --var-repo /path/to/VAR --what sample --depth 8 --json o.json

``--what train``: one training step as the official trainer does it from token ids (``idxBl_to_var_input``,
forward, cross-entropy averaged over tokens, backward, gradient clipping, AdamW step), like
``bench/bench_train.py`` (which also starts from token ids). ``--what sample``: ``autoregressive_infer_cfg``
(CFG, top-k, top-p, the VQVAE decode included). ``--what decode``: ``fhat_to_img`` of a random f_hat.
All float32 on CPU (or the official code's own bf16/fp16 autocast on CUDA with --dtype). Random weights:
VAR with its own ``init_weights``, the VQVAE (whose builder skips initialisation) with N(0, 0.02) weights.
Prints the same keys as the varjax benchmarks (``sample_time_s``, ``step_time_s``, ``images_per_s``), and the
memory: ``peak_rss_bytes`` (the whole process, from the OS), ``rss_after_build_bytes`` (once the models exist)
and on CUDA ``peak_device_bytes`` (``torch.cuda.max_memory_allocated``). ``--steps 0`` runs the warm-up call
only (a memory measurement). ``--patch-nums``, ``--vocab``, ``--cvae``, ``--vae-ch`` and ``--num-classes`` shrink
the models for a smoke run (the width stays 64 * depth, as the official builder sets it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from proc_memory import current_rss_bytes, peak_rss_bytes  # bench/ is the script's directory


def memory_breakdown(var, vae, opt, forward) -> dict[str, int]:
    """Bytes of what one training step holds: the VAR's parameters, their gradients, AdamW's state, the frozen
    VQVAE, and the tensors autograd saves for the backward pass during ``forward()`` (storages counted once,
    parameters themselves excluded)."""
    import torch

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    params = {p.untyped_storage().data_ptr() for p in var.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "var_params": nbytes(var.parameters()),
        "var_grads": nbytes(p.grad for p in var.parameters()),
        "adamw_state": nbytes(state),
        "vqvae": nbytes(vae.parameters()) + nbytes(vae.buffers()),
        "saved_for_backward": sum(saved.values()),
    }


def attention_path(var) -> str:
    """Which attention the official blocks run: flash-attn or xFormers when importable, else torch's SDPA."""
    attn = var.blocks[0].attn
    if getattr(attn, "using_flash", False):
        return "flash_attn (no mask: training without bias only), else SDPA"
    if getattr(attn, "using_xform", False):
        return "xformers memory_efficient_attention"
    return "torch scaled_dot_product_attention with an additive mask"


def op_category(name: str) -> str:
    """bench/profile_train.py's categories for a torch op (its self time, so nested ops are not counted twice)."""
    if "scaled_dot_product" in name or "flash_attention" in name or name in ("aten::bmm", "aten::baddbmm"):
        return "attention"
    if name in ("aten::mm", "aten::addmm"):
        return "weight products"
    return "other"


def profile_split(call, sync) -> dict[str, float]:
    """Seconds of op self time per category over one call; torch's eager ops run one after another on CPU."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
        sync()
    split = {"weight products": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.key_averages():
        split[op_category(e.key)] += e.self_cpu_time_total / 1e6
    return split


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--var-repo", required=True, help="checkout of https://github.com/FoundationVision/VAR")
    p.add_argument("--what", choices=("train", "sample", "decode"), required=True)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--resolution", type=int, default=256, choices=(256, 512))
    p.add_argument("--patch-nums", default=None, help="scales, e.g. 1,2,3,4 (default: the resolution's schedule)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--cvae", type=int, default=32)
    p.add_argument("--vae-ch", type=int, default=160, help="VQVAE base channels (a multiple of 32)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed calls after one warm-up call (0: the warm-up only)")
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.96)
    p.add_argument("--dtype", default="float32", help="float32, or bfloat16/float16 autocast (CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--memory-breakdown", action="store_true",
                   help="train: after the timed steps, count the bytes of parameters, gradients, AdamW state and "
                   "the tensors saved for the backward pass")
    p.add_argument("--profile", action="store_true",
                   help="also run one call under torch.profiler and split its op time as bench/profile_train.py")
    p.add_argument("--save-weights", default=None,
                   help="write the random models as the release's files (DIR/vae.pth, DIR/var_d{depth}.pth) and stop")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import torch

    sys.path.insert(0, a.var_repo)
    try:
        import huggingface_hub  # noqa: F401  (the official models import it for their Hub mixin only)
    except ImportError:
        import types

        sys.modules["huggingface_hub"] = types.SimpleNamespace(PyTorchModelHubMixin=type("Mixin", (), {}))
    from models import build_vae_var

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pns = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) if a.resolution == 256 else (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    if a.patch_nums:
        pns = tuple(int(x) for x in a.patch_nums.split(","))
    torch.manual_seed(0)
    vae, var = build_vae_var(
        device=dev,
        patch_nums=pns,
        V=a.vocab,
        Cvae=a.cvae,
        ch=a.vae_ch,
        num_classes=a.num_classes,
        depth=a.depth,
        shared_aln=a.resolution == 512,
        flash_if_available=dev.type == "cuda",
        fused_if_available=dev.type == "cuda",
    )
    with torch.no_grad():
        for prm in vae.parameters():  # the builder leaves the VQVAE uninitialised (loaded from a file normally)
            prm.normal_(0, 0.02)
    amp = a.dtype != "float32" and dev.type == "cuda"
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(a.dtype, torch.float32)
    if a.save_weights:  # what `varjax convert` reads, as the release ships it
        import os

        os.makedirs(a.save_weights, exist_ok=True)
        torch.save(vae.state_dict(), os.path.join(a.save_weights, "vae.pth"))
        torch.save(var.state_dict(), os.path.join(a.save_weights, f"var_d{a.depth}.pth"))
        print(f"wrote vae.pth and var_d{a.depth}.pth to {a.save_weights}")
        return {"saved": a.save_weights}
    B, V, L = a.batch_size, vae.vocab_size, sum(pn * pn for pn in pns)
    rss_after_build = current_rss_bytes()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if a.what == "train":
        var.train()
        opt = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        gen = torch.Generator().manual_seed(0)
        idx = [torch.randint(0, V, (B, pn * pn), generator=gen).to(dev) for pn in pns]
        label = torch.randint(0, a.num_classes, (B,), generator=gen).to(dev)
        gt_BL = torch.cat(idx, dim=1)
        loss_w = torch.full((1, L), 1.0 / L, device=dev)
        ce = torch.nn.CrossEntropyLoss(reduction="none")

        def forward():
            x = vae.quantize.idxBl_to_var_input(idx)
            with torch.autocast(dev.type, enabled=amp, dtype=amp_dtype):
                logits = var(label, x)
                return ce(logits.view(-1, V).float(), gt_BL.view(-1)).view(B, -1).mul(loss_w).sum(-1).mean()

        def call():
            loss = forward()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
            opt.step()
            return loss
    elif a.what == "sample":
        var.eval()
        labels = torch.arange(B, device=dev) % a.num_classes

        def call():
            with torch.inference_mode(), torch.autocast(dev.type, enabled=amp, dtype=amp_dtype):
                return var.autoregressive_infer_cfg(
                    B=B, label_B=labels, cfg=a.cfg, top_k=a.top_k, top_p=a.top_p, g_seed=0, more_smooth=False
                )
    else:
        f_hat = torch.randn(B, vae.Cvae, pns[-1], pns[-1], device=dev)

        def call():
            with torch.inference_mode(), torch.autocast(dev.type, enabled=amp, dtype=amp_dtype):
                return vae.fhat_to_img(f_hat)

    t0 = time.perf_counter()
    call()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times) if times else first
    key = "step_time_s" if a.what == "train" else "sample_time_s"
    res = {
        "impl": "official",
        "what": {"train": "train", "sample": "sample", "decode": "vqvae_decode"}[a.what],
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "depth": a.depth,
        "patch_nums": list(pns),
        "tokens_per_image": L,
        "attention": attention_path(var),
        "batch_size": B,
        "dtype": a.dtype,
        "first_call_s": first,
        "times_s": times,
        key: med,
        "images_per_s": B / med,
    }
    if a.what == "train":
        res["tokens_per_s"] = B * L / med
    res["rss_after_build_bytes"] = rss_after_build
    res["peak_rss_bytes"] = peak_rss_bytes()
    if dev.type == "cuda":
        res["peak_device_bytes"] = torch.cuda.max_memory_allocated()
        res["peak_device_reserved_bytes"] = torch.cuda.max_memory_reserved()
    if a.memory_breakdown and a.what == "train":
        res["memory_breakdown_bytes"] = memory_breakdown(var, vae, opt, forward)
    if a.profile:
        res["profile_s"] = profile_split(call, sync)
    for k, v in res.items():
        print(f"{k:>16}: {v:.4g}" if isinstance(v, float) else f"{k:>16}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
