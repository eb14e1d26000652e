"""A Hugging Face ``Trainer`` run on a tiny Llama built locally (no downloads): gradient
accumulation, clipping (``max_grad_norm``), a checkpoint every ``save_steps``, and
``--resume`` continuing from one with ``trainer.train(resume_from_checkpoint=...)``.

The optimizer reaches the Trainer one of two ways (``--route``):
``optimizers=(optimizer, scheduler)`` or ``optimizer_cls_and_kwargs=(cls, kwargs)``. Either way
the one line that differs between ``--optimizer sharded`` and ``--optimizer adamw`` is the
optimizer class. Weight decay is 0 so that both routes build the same optimizer (the Trainer
exempts biases and norm weights from decay in its own parameter groups). Llama rather than
GPT-2: GPT-2's key bias has a gradient that is only rounding noise (see ``tests/test_stacks.py``).

    torchrun --standalone --nproc_per_node 2 -m tests.clients.trainer_client --optimizer sharded
"""

from __future__ import annotations

import argparse

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

from sharded_adamw import ShardedAdamW
from tests.clients.report import exit_cleanly, write_result

LR, MAX_STEPS, SEQ = 2e-2, 8, 12


def dataset(n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed sequences of a small repeating language."""
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 64, (n,), generator=g)
    steps = torch.randint(1, 5, (n,), generator=g)
    rows = [(s + k * torch.arange(SEQ)) % 64 for s, k in zip(starts, steps)]
    return [{"input_ids": r, "labels": r} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--optimizer", choices=["sharded", "adamw"], required=True)
    ap.add_argument("--route", choices=["optimizers", "cls"], default="optimizers")
    ap.add_argument("--out", required=True, help="final parameters and loss go to OUT.rank<r>")
    ap.add_argument("--output-dir", required=True, help="the Trainer's checkpoint-<step> dirs")
    ap.add_argument("--resume", help="a checkpoint directory to continue from")
    ap.add_argument("--max-grad-norm", type=float, default=0.5, help="0 disables clipping")
    args = ap.parse_args()

    training_args = TrainingArguments(  # under torchrun this initialises the process group
        output_dir=args.output_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=MAX_STEPS,
        learning_rate=LR,
        weight_decay=0.0,
        max_grad_norm=args.max_grad_norm,
        save_steps=4,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    model = LlamaForCausalLM(config)
    cls = ShardedAdamW if args.optimizer == "sharded" else torch.optim.AdamW
    if args.route == "optimizers":
        optimizer = cls(model.parameters(), lr=LR, weight_decay=0.0)
        scheduler = get_linear_schedule_with_warmup(optimizer, 0, MAX_STEPS)
        choice = {"optimizers": (optimizer, scheduler)}
    else:
        choice = {"optimizer_cls_and_kwargs": (cls, {"lr": LR})}
    data = dataset(64)
    trainer = Trainer(model=model, args=training_args, train_dataset=data, **choice)
    trainer.train(resume_from_checkpoint=args.resume)

    batch = {k: torch.stack([row[k] for row in data[:16]]) for k in ("input_ids", "labels")}
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    write_result(args.out, model.named_parameters(), loss)
    exit_cleanly()


if __name__ == "__main__":
    main()
