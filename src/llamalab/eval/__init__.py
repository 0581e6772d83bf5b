"""Evaluate a model the way the LLaMA paper did.

One module per concept:

* ``data``: the benchmark files shipped inside PyPI wheels, located without importing
  their packages and checked against recorded sha256 digests;
* ``items``: what a task hands the scorer (multiple-choice and generation items);
* ``tasks``: MMLU, SIQA, GSM8K, HumanEval and user JSONL files, turned into items with
  their prompts; ``prompts`` holds the fixed few-shot exemplars;
* ``likelihood``: log-likelihoods of continuations on the model, a context's cache shared
  by its choices; ``scoring``: raw / per-character / "Answer:" normalisations, metrics;
* ``perplexity``: sliding-window perplexity and bits per byte;
* ``sandbox``: running generated code in a limited subprocess; ``passk``: pass@k;
* ``runner``: drives a task end to end; ``lm_eval_backend``: llamalab as an lm-eval model.

Nothing here is imported by the core (model, generation, tokenizer), and importing
``llamalab.eval`` loads neither torch nor lm-eval.
"""
