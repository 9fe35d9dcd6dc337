"""How far an fp32 result may move when a parallel layout or another CPU adds its terms in another order.

Tensor parallelism splits a matmul's reduction over ranks and adds the partial sums in an all-reduce;
sequence and pipeline parallelism move where sums are taken; data parallelism averages gradients over
ranks; packing changes the rows a softmax or a loss sums over; and each CPU's kernels (ATen's AVX512, AVX2
or scalar code, MKL's blocking for its instruction set, the thread count) choose their own order inside
every dot product. fp32 addition is not associative: a sum of terms x_i, reordered, moves by up to about
EPS * sum |x_i| for each rounding the new order changes (EPS = 2^-23 = 1.19e-7, the spacing of fp32 numbers
at 1). So a tolerance follows from the magnitude of the terms that were summed, not from the result: a
difference of large sums (a DPO reward margin) keeps the absolute error of the sums and loses relative
precision.

Our test models are tiny Llama-like networks of 2-4 layers. Per layer a forward chains about ten
reductions (input norm, qkv, attention scores, softmax, probability-weighted values, output projection,
second norm, fc1, fc2); with the final norm, the output layer and the log-softmax a forward chains D = 45 or
fewer, each moving its output by up to ~EPS relative to its terms' scale; a backward chains as many again.
The constants below are these bounds, rounded up. Comparisons with an outside reference (transformers, HF
PEFT, TRL, a float64 computation) and bitwise checks of one computation in one layout keep their own.

Measured on a 2-core AVX512 machine with ATen's AVX512, AVX2 and scalar kernels and MKL's AVX512, AVX2 and
SSE4.2 paths selected (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS): DPO metrics at TP=2+SP, PP=2, DP=2
and packed moved by at most 1.9e-6 (a tenth of DPO_ATOL; the IPO margin by 1.7e-6, where the earlier
tolerance of 1e-6 failed), DPO LoRA gradients by 1.7e-5 of their largest entry (packed pairs at TP=2+SP,
a sixth of GRAD_REL), the LoRA gradients of tests/models/test_model_parallel.py by 1.1e-6 and its loss by 5e-8.
"""

EPS = 2.0 ** -23  # 1.19e-7, torch.finfo(torch.float32).eps

FORWARD_REL = 1e-5
"""A forward output (a logit, a per-token log-prob, a loss: the mean of -log p over target tokens),
relative to the scale of the terms it sums (a loss's own value; the largest logit of a tensor): each value
carries at most the D = 45 roundings of its forward chain lined up, 45 * EPS = 5.4e-6, and a mean adds
none; 1e-5 is that bound, rounded up."""

GRAD_REL = 1e-4
"""A gradient entry, relative to the largest entry of its tensor: the backward doubles the chain (90 * EPS =
1.1e-5 of the summed terms' scale), and a weight's gradient sums T token contributions of both signs, whose
magnitudes exceed the largest resulting entry by up to ~sqrt(T) (T = 30-150 target tokens here, so ~10):
1.1e-4, rounded to 1e-4."""

TRAINED_ATOL = 1e-5
"""A weight or adapter factor after a few optimizer steps at another layout, absolute. Adam moves a weight
by lr * m / (sqrt(v) + eps), which depends on a gradient entry's relative error d only through
lr * d * eps * |g| / (|g| + eps)^2 <= lr * d / 4: after n steps with d = GRAD_REL, lr <= 5e-3 and n <= 4 the
weights differ by at most 5e-7; 1e-5 leaves room for entries far below their tensor's largest, whose own
relative error is larger. The losses of those steps keep FORWARD_REL: weights this close move them by less
than their own rounding."""

DPO_ATOL = 2e-5
"""A DPO metric (loss, rewards, margin, log-probs, NLL), absolute. Each log-prob is a sum over a response's
tokens (here 2-6 tokens of ~ln 256 = 5.5: ~22 in magnitude); a reward margin is beta times the signed sum
of four of them (policy and reference, chosen and rejected: ~90 together), so a few roundings of that size
move it by EPS * 90 = 1.1e-5 before beta <= 1 scales it; the losses are smooth functions of it with slope
at most 2 here (IPO: 2 |h - 1/(2 beta)|), so 2 * 1.1e-5, rounded to 2e-5. Relative to a margin of 0.09 that
is 2e-4: the margin is a small difference of large sums."""
