"""Evaluations: passkey retrieval (passkey.py), long-document perplexity (perplexity.py), BookSum summarization
with ROUGE (summarization.py, rouge.py), Table 1 memory footprints (memory_footprint.py), and diagnostics of
why a memory retrieves or not at long lengths (memory_probe.py).

Each is a plain function on a model and a tokenizer (what the training loop calls) that also writes JSONL /
JSON / markdown / PNG files when given an output directory; `python -m evaluation task=... checkpoint=...`
runs them from a model directory with the Hydra configs in conf/eval/.
"""
