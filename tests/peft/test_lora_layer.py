"""LoRALinear under every TP/SP layout against a single-process float64 reference, with bytes counted.

Shapes are tiny: tokens T = s * b = 8 * 2, hidden 32, output 48 (column) / input 48 (row), rank r = 6,
so r is not divisible by TP = 4. For each layout the wrapped layer's output, the input gradient and the
gradients of A and B (after megatron's own gradient finalisation, which all-reduces over TP the gradients
of parameters marked ``sequence_parallel``) must equal ``y = x W^T + s (x A^T) B^T`` computed in float64
with the full weights, within 1e-5 relative.

Bytes moved by the LoRA branch alone (forward + backward), per rank, counting each collective by its full
(unsharded) buffer: the all-reduced tensor, the all-gather output, the reduce-scatter input. With
element size e = 4 (fp32):

    column, no SP:  backward all-reduce of du [s, b, r]                               T * r * e
    column, SP:     forward all-gather of u + backward reduce-scatter of du [s, b, r] 2 * T * r * e
    row, no SP:     forward all-reduce of u [s, b, r]                                 T * r * e
    row, SP:        forward reduce-scatter of u + backward all-gather of du [s, b, r] 2 * T * r * e
    TP = 1:         nothing                                                           0

and every communicated tensor's last dimension is r, never the hidden or output width.
"""

from __future__ import annotations

import pytest

from launch.spawn import run_distributed

S, B, H, O, R = 8, 2, 32, 48, 6
ALPHA = 12.0
E = 4  # fp32 bytes


def expected_bytes(mode: str, sp: bool, tp: int) -> int:
    if tp == 1:
        return 0
    return (2 if sp else 1) * S * B * R * E


class _Counter:
    """Wraps torch.distributed collectives (and megatron's import-time aliases of them) to record
    (name, shape of the full buffer, bytes)."""

    NAMES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "_all_gather_base",
             "_reduce_scatter_base", "all_gather", "reduce_scatter")

    def __init__(self):
        self.calls = []
        self._saved = []

    def _wrap(self, owner, name, label, full_arg):
        orig = getattr(owner, name)
        counter = self

        def wrapped(*args, **kwargs):
            t = args[full_arg]
            if isinstance(t, (list, tuple)):  # list variants: count the whole list
                shape = (len(t), *t[0].shape)
                nbytes = sum(x.numel() * x.element_size() for x in t)
            else:
                shape, nbytes = tuple(t.shape), t.numel() * t.element_size()
            counter.calls.append((label, shape, nbytes))
            return orig(*args, **kwargs)

        self._saved.append((owner, name, orig))
        setattr(owner, name, wrapped)

    def __enter__(self):
        import torch.distributed as dist
        from megatron.core.tensor_parallel import mappings

        # all_reduce(tensor), all_gather_into_tensor(output, input), reduce_scatter_tensor(output, input)
        full_arg = {"all_reduce": 0, "all_gather_into_tensor": 0, "_all_gather_base": 0, "all_gather": 0,
                    "reduce_scatter_tensor": 1, "_reduce_scatter_base": 1, "reduce_scatter": 1}
        for name in self.NAMES:
            if hasattr(dist, name):
                self._wrap(dist, name, name, full_arg[name])
        # megatron binds these two at import time, so patching torch.distributed alone misses them.
        self._wrap(mappings, "dist_all_gather_func", "all_gather", 0)
        self._wrap(mappings, "dist_reduce_scatter_func", "reduce_scatter", 1)
        return self

    def __exit__(self, *exc):
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)


def _run_layouts():
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from framework.models.config import ModelConfig
    from framework.models.gpt import transformer_config
    from framework.peft.lora import LoRALinear
    from framework.runtime import distributed as rtd

    world = rtd.world_size_from_env()
    rtd.initialize(tp=world, pp=1, seed=1234)
    tp, rank, group = world, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    results = []

    def chunk(t, dim):
        return t.chunk(tp, dim=dim)[rank].contiguous()

    for mode in ("column", "row"):
        for sp in ((False, True) if tp > 1 else (False,)):
            cfg = transformer_config(ModelConfig(hidden_size=H, num_attention_heads=4, ffn_hidden_size=O), tp, 1, sp)
            in_f, out_f = (H, O) if mode == "column" else (O, H)
            if mode == "column":
                base = ColumnParallelLinear(in_f, out_f, config=cfg, init_method=cfg.init_method, bias=False,
                                            gather_output=False)
            else:
                base = RowParallelLinear(in_f, out_f, config=cfg, init_method=cfg.init_method, bias=False,
                                         input_is_parallel=True, skip_bias_add=True)
            layer = LoRALinear(base, rank=R, alpha=ALPHA, init_seed=7)

            g = torch.Generator().manual_seed(100)
            W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f ** 0.5
            A = torch.randn(R, in_f, generator=g, dtype=torch.float64) / in_f ** 0.5
            Bm = torch.randn(out_f, R, generator=g, dtype=torch.float64)  # non-zero so A gets gradients
            x = torch.randn(S, B, in_f, generator=g, dtype=torch.float64)
            gy = torch.randn(S, B, out_f, generator=g, dtype=torch.float64)
            with torch.no_grad():
                if mode == "column":
                    base.weight.copy_(chunk(W, 0)); layer.lora_A.weight.copy_(A); layer.lora_B.weight.copy_(chunk(Bm, 0))
                else:
                    base.weight.copy_(chunk(W, 1)); layer.lora_A.weight.copy_(chunk(A, 1)); layer.lora_B.weight.copy_(Bm)

            # float64 single-process reference with the full weights
            xr, Ar, Br = x.clone().requires_grad_(), A.clone().requires_grad_(), Bm.clone().requires_grad_()
            yr = xr @ W.T + layer.scaling * (xr @ Ar.T) @ Br.T
            yr.backward(gy)

            # this rank's slices of input, output and upstream gradient
            if mode == "column":
                x_loc = chunk(x, 0) if sp else x
                y_want, gy_loc = chunk(yr.detach(), 2), chunk(gy, 2)
                dx_want = chunk(xr.grad, 0) if sp else xr.grad
                dA_want, dB_want = Ar.grad, chunk(Br.grad, 0)
            else:
                x_loc = chunk(x, 2)
                y_want = chunk(yr.detach(), 0) if sp else yr.detach()
                gy_loc = chunk(gy, 0) if sp else gy
                dx_want, dA_want, dB_want = chunk(xr.grad, 2), chunk(Ar.grad, 1), Br.grad

            xl = x_loc.float().requires_grad_()
            y, _ = layer(xl)
            y.backward(gy_loc.float())
            holder = torch.nn.Module()
            holder.layer = layer
            holder.ddp_config = DistributedDataParallelConfig()
            _allreduce_non_tensor_model_parallel_grads([holder], cfg, group)  # what finalize_model_grads does

            def rel(a, b):
                return ((a.double() - b).abs().max() / b.abs().max()).item()

            errors = {"y": rel(y.detach(), y_want), "dx": rel(xl.grad, dx_want),
                      "dA": rel(layer.lora_A.weight.grad, dA_want), "dB": rel(layer.lora_B.weight.grad, dB_want)}
            A_p, B_p = layer.lora_A.weight, layer.lora_B.weight
            attrs = {"A": (A_p.tensor_model_parallel, A_p.partition_dim, getattr(A_p, "sequence_parallel", False)),
                     "B": (B_p.tensor_model_parallel, B_p.partition_dim, getattr(B_p, "sequence_parallel", False)),
                     "W_frozen": base.weight.grad is None and not base.weight.requires_grad}

            # bytes of the LoRA branch alone, forward + backward
            layer.zero_grad()
            xb = x_loc.float().requires_grad_()
            with _Counter() as counter:
                layer.lora_forward(xb).backward(gy_loc.float())

            # dropout masks: replicated input -> the same mask on every TP rank; sharded -> per-rank stream
            drop = LoRALinear(base, rank=R, alpha=ALPHA, dropout=0.5, init_seed=7).train()
            ones = torch.ones(S // tp if (sp and mode == "column") else S, B, base.weight.shape[1])
            mask = (drop._dropped(ones) != 0).to(torch.uint8)
            masks = [torch.empty_like(mask) for _ in range(tp)]
            dist.all_gather(masks, mask, group=group)
            same_mask = all(torch.equal(m, masks[0]) for m in masks)

            results.append({"mode": mode, "sp": sp, "tp": tp, "errors": errors, "attrs": attrs,
                            "calls": counter.calls, "same_mask": same_mask})
    return results


@pytest.mark.timeout(150)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_lora_layer_matches_reference(tp):
    per_rank = run_distributed(_run_layouts, tp, timeout=140)
    for rank, results in enumerate(per_rank):
        for res in results:
            mode, sp = res["mode"], res["sp"]
            where = f"{mode}-parallel TP={tp} SP={sp} rank {rank}"
            for name, err in res["errors"].items():
                assert err < 1e-5, f"{where}: {name} relative error {err:.3g}"
            assert res["attrs"]["W_frozen"], where
            a_tp, a_dim, a_sp = res["attrs"]["A"]
            b_tp, b_dim, b_sp = res["attrs"]["B"]
            if mode == "column":
                assert (a_tp, a_sp, b_tp, b_dim, b_sp) == (False, sp, True, 0, False), where
            else:
                assert (a_tp, a_dim, a_sp, b_tp, b_sp) == (True, 1, False, False, sp), where
            calls = res["calls"]
            assert all(shape[-1] == R for _, shape, _ in calls), f"{where}: non r-wide collective {calls}"
            total = sum(nbytes for _, _, nbytes in calls)
            assert total == expected_bytes(mode, sp, tp), f"{where}: {total} bytes, calls {calls}"
            if tp > 1:
                want_kinds = {("column", False): ["all_reduce"], ("column", True): ["all_gather", "reduce_scatter"],
                              ("row", False): ["all_reduce"], ("row", True): ["reduce_scatter", "all_gather"]}
                assert [c[0] for c in calls] == want_kinds[(mode, sp)], f"{where}: {calls}"
                # the hidden-wide alternative (all-gather / all-reduce of the out-wide LoRA output) would move
                # T * out * e; the r-wide path is out / r (here 8x for column, 5.3x for row) smaller per collective
                replicated_input = mode == "column" and not sp
                assert res["same_mask"] == replicated_input, f"{where}: dropout mask sharing wrong"
