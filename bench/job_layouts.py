"""Run the default job (SmolLM2-135M LoRA on HumanEval) at several layouts under torchrun and compare
every layout's training and validation losses with the single-process run.

    python bench/job_layouts.py                                   # 4 steps; TP=3, TP=3+SP, PP=2, DP=2
    python bench/job_layouts.py --steps 8 --layouts tp3 pp2

Each run writes runs/layouts/<name>/summary.json; the table at the end gives the largest relative
difference of any per-step training loss and of the final validation loss against the single process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {
    "single": (1, []),
    "tp3": (3, ["parallel.tensor=3"]),
    "tp3-sp": (3, ["parallel.tensor=3", "parallel.sequence=true"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "dp2": (2, []),
}


def run(name, steps, out_root, extra):
    nproc, overrides = LAYOUTS[name]
    out = os.path.join(out_root, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-port=29555", "launch/finetune.py", f"trainer.max_steps={steps}", "trainer.eval_interval=1000",
           "generate.max_new_tokens=0", f"output_dir={out}", *overrides, *extra]
    print("$", " ".join(cmd[2:] if nproc > 1 else [cmd[0]] + cmd[5:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "FRAMEWORK_LOG_LEVEL": "WARNING"})
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f), time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="optimiser steps per run (default 4)")
    p.add_argument("--layouts", nargs="*", default=["tp3", "tp3-sp", "pp2", "dp2"], choices=list(LAYOUTS)[1:],
                   help="layouts to compare with the single-process run")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "layouts"), help="where runs write")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    a = p.parse_args(argv)
    ref, t_ref = run("single", a.steps, a.out, a.overrides)
    rows = [("single", ref, t_ref, 0.0, 0.0)]
    for name in a.layouts:
        s, t = run(name, a.steps, a.out, a.overrides)
        d_train = max(abs(x - y) / abs(y) for x, y in zip(s["train_losses"], ref["train_losses"]))
        d_val = abs(s["val_loss_after"] - ref["val_loss_after"]) / abs(ref["val_loss_after"])
        rows.append((name, s, t, d_train, d_val))
    print(f"\n{'layout':<8}{'TP':>3}{'PP':>3}{'DP':>3}{'SP':>4}  {'train loss first -> last':<26}"
          f"{'val before -> after':<22}{'max rel diff train':>19}{'rel diff val':>14}{'wall s':>8}")
    for name, s, t, d_train, d_val in rows:
        lay = s["layout"]
        print(f"{name:<8}{lay['tp']:>3}{lay['pp']:>3}{lay['dp']:>3}{'on' if lay['sp'] else 'off':>4}  "
              f"{s['train_losses'][0]:.5f} -> {s['train_losses'][-1]:.5f}{'':<6}"
              f"{s['val_loss_before']:.5f} -> {s['val_loss_after']:.5f}{'':<2}{d_train:>19.2e}{d_val:>14.2e}{t:>8.0f}")


if __name__ == "__main__":
    main()
