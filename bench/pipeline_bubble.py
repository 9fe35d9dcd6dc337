"""Pipeline bubble: measured idle fraction per stage of megatron's 1F1B schedule vs (p-1)/(m+p-1).

    python bench/pipeline_bubble.py                          # PP=2 and PP=4, m = 4 and 8, model and sleep
    python bench/pipeline_bubble.py --pp 2 --micro-batches 8 16 --compute model

Each stage runs in a spawned gloo rank (launch/spawn.py) and trains with megatron's own
pipeline schedule (``get_forward_backward_func``: ``forward_backward_pipelining_without_interleaving``,
or ``..._with_interleaving`` for ``--virtual`` v > 1). The schedule's ``forward_step`` and
``backward_step`` are wrapped with timestamps (CLOCK_MONOTONIC, the same clock in every process), so
each stage knows when it computed. Over one step:

    window  = [first compute start on any stage, last compute end on any stage]
    idle_i  = 1 - (sum of stage i's forward and backward durations) / window

averaged over the measured steps (after one warm-up step). Theory for p stages and m micro-batches, with
every stage taking the same tf per forward and tb per backward and free communication: the window is
(m + p - 1)(tf + tb) and each stage computes m (tf + tb), so idle = (p - 1) / (m + p - 1); interleaved
with v model chunks per stage (each 1/v of the stage): (p - 1) / (v m + p - 1).

Two kinds of compute:
  model  a Llama-shaped GPT, two layers per stage (hidden 512, seq 128): real megatron forward and
         backward. On this machine p processes share 2 cores, so stages slow each other down while all
         compute (steady state) and speed up in the ramps; the last stage also holds the output layer and
         the loss, the first the embedding. Both make the measured bubble differ from the formula.
  sleep  a tiny model (hidden 64, two layers per stage) whose every forward also sleeps F ms and every
         backward 2F ms (F / v and 2F / v per chunk when interleaved): balanced stages that do not compete
         for cores, so what remains is the schedule itself plus megatron's point-to-point communication.

Interleaving (``--virtual v``) runs on CPU unchanged: each stage holds v GPTModel chunks of 1/v of its
layers (megatron's ``vp_stage``), built here because build_gpt builds one chunk per pipeline rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # hidden, layers per stage, seq, vocab, ffn
    "model": dict(hidden=512, layers_per_stage=2, seq=128, vocab=512, ffn=1408),
    "sleep": dict(hidden=64, layers_per_stage=2, seq=16, vocab=256, ffn=128),
}


def theory(p: int, m: int, v: int = 1) -> float:
    return (p - 1) / (v * m + p - 1)


class StepTimer:
    """Wraps megatron's schedules.forward_step / backward_step: records (kind, start, end) per call and,
    with ``sleep_ms``, sleeps that long in every forward (twice that in every backward) as if computing."""

    def __init__(self, sleep_ms: float = 0.0):
        self.sleep_s = sleep_ms / 1000
        self.events: list[tuple[str, float, float]] = []
        self._saved = []

    def _wrap(self, kind, orig, factor):
        def wrapped(*args, **kwargs):
            t0 = time.monotonic()
            if self.sleep_s:
                time.sleep(factor * self.sleep_s)
            out = orig(*args, **kwargs)
            self.events.append((kind, t0, time.monotonic()))
            return out

        return wrapped

    def __enter__(self):
        from megatron.core.pipeline_parallel import schedules

        for name, kind, factor in (("forward_step", "F", 1), ("backward_step", "B", 2)):
            orig = getattr(schedules, name)
            self._saved.append((schedules, name, orig))
            setattr(schedules, name, self._wrap(kind, orig, factor))
        return self

    def __exit__(self, *exc):
        for owner, name, orig in self._saved:
            setattr(owner, name, orig)


def _build_chunks(model_cfg, pp: int, v: int):
    """This stage's model chunks. v = 1: build_gpt. v > 1: one GPTModel per virtual stage (build_gpt builds
    one chunk per pipeline rank; interleaving needs megatron's vp_stage for pre/post-processing)."""
    import torch
    from megatron.core import parallel_state as ps

    from framework.models import rope
    from framework.models.gpt import _gpt_class, build_gpt, layer_spec, transformer_config

    if v == 1:
        return [build_gpt(model_cfg, 1, pp)]
    config = transformer_config(model_cfg, 1, pp, False, torch.float32, False,
                                virtual_pipeline_model_parallel_size=v)
    chunks = []
    for vp in range(v):
        gpt = _gpt_class()(
            config=config, transformer_layer_spec=layer_spec(config, use_te=False), vocab_size=model_cfg.vocab_size,
            max_sequence_length=model_cfg.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=False, position_embedding_type="rope",
            rotary_base=int(model_cfg.rotary_base), parallel_output=True, vp_stage=vp)
        rope.install(gpt.rotary_pos_emb, model_cfg)
        chunks.append(gpt)
    return chunks


def _stage(pp: int, runs: list[tuple[str, int, int]], steps: int, sleep_ms: float) -> list[dict]:
    """In each rank: for every (compute, m, v), one warm-up step and ``steps`` timed steps of megatron's
    schedule; returns this stage's compute events per timed step."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from framework.models.config import ModelConfig
    from framework.runtime import initialize
    from framework.runtime.distributed import seed_everything
    from framework.training.optim import wrap_ddp
    from framework.training.step import forward_step_fn as _forward_step_fn

    initialize(tp=1, pp=pp, seed=0)
    out = []
    for compute, m, v in runs:
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(pipeline_model_parallel_size=pp,
                                     virtual_pipeline_model_parallel_size=v if v > 1 else None)
        seed_everything(0)
        s = SHAPES[compute]
        if s["layers_per_stage"] % v:
            raise ValueError(f"--virtual {v} does not divide the {s['layers_per_stage']} layers per stage")
        model_cfg = ModelConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_layers=s["layers_per_stage"] * pp,
                                num_attention_heads=4, num_query_groups=2, ffn_hidden_size=s["ffn"],
                                max_position_embeddings=max(256, s["seq"]))
        chunks = [wrap_ddp(c) for c in _build_chunks(model_cfg, pp, v)]
        if v > 1:
            chunks[0].config.no_sync_func = [c.no_sync for c in chunks]
        g = torch.Generator().manual_seed(1)
        mbs = []
        for _ in range(m):
            tokens = torch.randint(0, s["vocab"], (1, s["seq"] + 1), generator=g)
            mbs.append(dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(1, s["seq"]),
                            position_ids=torch.arange(s["seq"])[None]))

        def step():
            for c in chunks:
                c.zero_grad_buffer()
            get_forward_backward_func()(
                forward_step_func=_forward_step_fn("fp32", torch.device("cpu")),
                data_iterator=[iter(mbs) for _ in chunks] if v > 1 else iter(mbs),
                model=chunks, num_microbatches=m, seq_length=s["seq"], micro_batch_size=1, forward_only=False)

        step()  # warm-up
        for _ in range(steps):
            torch.distributed.barrier()
            with StepTimer(sleep_ms / v if compute == "sleep" else 0.0) as timer:  # a chunk is 1/v of the stage
                step()
            out.append(dict(compute=compute, m=m, v=v, stage=ps.get_pipeline_model_parallel_rank(),
                            events=timer.events))
    return out


def measure(pp: int, runs: list[tuple[str, int, int]], steps: int, sleep_ms: float, timeout: float = 900):
    """[(compute, m, v, [idle fraction of stage 0..p-1], mean forward s, mean backward s)] per run."""
    from launch.spawn import run_distributed

    per_rank = run_distributed(_stage, pp, pp, runs, steps, sleep_ms, timeout=timeout)
    results = []
    for i, (compute, m, v) in enumerate(runs):
        idle = [0.0] * pp
        f_times, b_times = [], []
        for k in range(steps):
            recs = [r[i * steps + k] for r in per_rank]
            start = min(e[1] for r in recs for e in r["events"])
            end = max(e[2] for r in recs for e in r["events"])
            for r in recs:
                busy = sum(t1 - t0 for _, t0, t1 in r["events"])
                idle[r["stage"]] += (1 - busy / (end - start)) / steps
                f_times += [t1 - t0 for kind, t0, t1 in r["events"] if kind == "F"]
                b_times += [t1 - t0 for kind, t0, t1 in r["events"] if kind == "B"]
        results.append((compute, m, v, idle, sum(f_times) / len(f_times), sum(b_times) / len(b_times)))
    return results


def table(pp_results: dict[int, list]) -> str:
    lines = [f"{'compute':<8}{'PP':>3}{'v':>3}{'m':>4}{'theory':>8}{'measured mean':>15}  idle per stage"
             f"{'':<18}{'fwd ms':>8}{'bwd ms':>8}"]
    for pp, results in pp_results.items():
        for compute, m, v, idle, tf, tb in results:
            per_stage = " ".join(f"{x:.3f}" for x in idle)
            lines.append(f"{compute:<8}{pp:>3}{v:>3}{m:>4}{theory(pp, m, v):>8.3f}{sum(idle) / pp:>15.3f}  "
                         f"{per_stage:<32}{tf * 1e3:>8.1f}{tb * 1e3:>8.1f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", nargs="*", type=int, default=[2, 4], help="pipeline sizes (default 2 4)")
    p.add_argument("--micro-batches", nargs="*", type=int, default=[4, 8], help="m per step (default 4 8)")
    p.add_argument("--compute", nargs="*", default=["sleep", "model"], choices=list(SHAPES))
    p.add_argument("--virtual", type=int, default=2,
                   help="also run the interleaved schedule with this many chunks per stage (1: skip; default 2)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (default 2)")
    p.add_argument("--sleep-ms", type=float, default=80.0, help="sleep per forward in 'sleep' mode (default 80)")
    a = p.parse_args(argv)
    out = {}
    for pp in a.pp:
        runs = [(c, m, 1) for c in a.compute for m in a.micro_batches]
        if a.virtual > 1:
            runs += [(c, m, a.virtual) for c in a.compute for m in a.micro_batches if m >= pp]
        out[pp] = measure(pp, runs, a.steps, a.sleep_ms)
    print()
    print(table(out))


if __name__ == "__main__":
    main()
