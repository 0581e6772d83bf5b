"""Fine-tune a model on instruction data: LoRA (on a float or packed base) or every weight.

    llamalab finetune configs/finetune/lora.toml --set model=MODEL --set data=items.jsonl
    llamalab finetune configs/finetune/full.toml --set out_dir=runs/full
    torchrun --standalone --nproc_per_node 2 -m llamalab finetune configs/finetune/lora.toml

MODEL is any checkpoint llamalab loads (GGUF file, Hugging Face or Meta folder); a GGUF
base stays packed in its stored quantization while the adapters train (base = "float"
dequantizes it). data is a JSONL file of chat ({"messages": [...]}), Alpaca
(instruction/input/output), ShareGPT ({"conversations": [...]}) or {"text": ...} items;
chats are rendered with the model's chat template and only the assistant's tokens are
trained. Items are packed into rows of seq_len, each attending only to itself
(packing = false: one item per row). val_fraction of the items are held out; their loss is reported every eval_every
steps. Every input is checked before training starts, and nothing is overwritten.

out_dir gets finetune.json (the run), metrics.jsonl, loss.png, checkpoints/ and
adapter/: a PEFT folder (adapter_config.json, adapter_model.safetensors, SHA256SUMS),
rewritten with each checkpoint, which `llamalab generate --lora OUT_DIR/adapter` and
peft.PeftModel.from_pretrained load. A full fine-tune writes export/, a Meta folder,
at the end. Running the same command again resumes from the newest checkpoint
(SIGINT/SIGTERM save one and stop); an out_dir holding another run is refused.
Under torchrun each process holds the model, takes its share of every step's
micro-batches and averages the gradients with the others; rank 0 writes the outputs.

--set KEY=VALUE overrides a config key: model, data, out_dir, method (lora|full), rank,
alpha, dropout, targets (["wq","wv"], among wq wk wv wo w1 w2 w3 output), lr,
max_steps or epochs, batch_tokens, seq_len, micro_batch_size, seed, checkpoint_every,
eval_every, val_fraction, base (auto|packed|float), packing (true|false), threads ...
"""

from __future__ import annotations

import argparse

from llamalab.cli.train import add_run_arguments, progress_from_args, report_stopped

DESCRIPTION = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "fine-tuning config")


def run(args: argparse.Namespace) -> int:
    import signal
    import sys

    from llamalab.train.finetune import finetune, load_finetune_config

    cfg = load_finetune_config(args.config, args.overrides)
    summary = finetune(cfg, progress=progress_from_args(args))
    if summary["rank"] != 0:  # under torchrun, rank 0 speaks for the job
        return 128 + int(getattr(signal, summary["stopped_by"])) if summary.get("stopped_by") else 0
    if summary["already_finished"]:
        print(
            f"llamalab finetune: {cfg.out_dir} already finished at step {summary['step']}; "
            f"its output is in {summary['export']}. To train further, run again with "
            f"--set max_steps=N (N > {summary['step']})",
            file=sys.stderr,
        )
        return 0
    if summary["stopped_by"]:
        return report_stopped("finetune", summary)
    print(
        f"llamalab finetune: step {summary['step']}, loss {summary['loss']:.4f}, "
        f"{summary['tokens_per_s']:,.0f} tokens/s; written to {summary['export']}",
        file=sys.stderr,
    )
    return 0
