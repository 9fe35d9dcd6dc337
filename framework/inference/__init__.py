"""Inference: logits at any layout (logits.py), KV-cache generation (kv_cache.py, generate.py, sampling.py),
teacher-forced scoring (scoring.py), EM / F1 (metrics.py), and the generate / eval job (job.py, requests.py,
loading.py, options.py) behind launch/generate.py and launch/evaluate.py."""
