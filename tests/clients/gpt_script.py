"""A plain torchrun GPT training script of the most copied kind (nanoGPT's ``train.py``),
shrunk to a tiny model: DDP, ``torch.compile``, gradient accumulation by toggling
``model.require_backward_grad_sync``, ``torch.nn.utils.clip_grad_norm_`` on
``model.parameters()``, and a checkpoint written by the master process only. No biases
(nanoGPT's default ``bias = False``); see ``tests/test_stacks.py`` for why that matters here.

The only line that differs between ``--optimizer sharded`` and ``--optimizer adamw`` is the
one that builds the optimizer in ``GPT.configure_optimizers``.

    torchrun --standalone --nproc_per_node 2 -m tests.clients.gpt_script --optimizer sharded
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW
from tests.clients.report import exit_cleanly, write_result

VOCAB, BLOCK = 64, 16


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=False),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, n_layer: int = 2, n_head: int = 2, n_embd: int = 32):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, n_embd)
        self.wpe = nn.Embedding(BLOCK, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))

    def configure_optimizers(self, weight_decay, learning_rate, betas, optimizer):
        params = [p for p in self.parameters() if p.requires_grad]
        optim_groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        cls = ShardedAdamW if optimizer == "sharded" else torch.optim.AdamW
        return cls(optim_groups, lr=learning_rate, betas=betas)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--optimizer", choices=["sharded", "adamw"], required=True)
    ap.add_argument("--out", required=True, help="final parameters and loss go to OUT.rank<r>")
    ap.add_argument("--out-dir", required=True, help="where the master writes ckpt.pt")
    ap.add_argument("--init-from", choices=["scratch", "resume"], default="scratch")
    ap.add_argument("--max-iters", type=int, default=8)
    ap.add_argument("--eval-interval", type=int, default=4)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    gradient_accumulation_steps, batch_size = 2, 4
    learning_rate, warmup_iters, weight_decay = 3e-2, 2, 0.1
    init_process_group(backend="gloo")
    ddp_rank = int(os.environ["RANK"])
    master_process = ddp_rank == 0
    torch.manual_seed(1337)
    device = "cpu"
    corpus = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(0))

    def get_batch(it: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 * it + 100 * ddp_rank + micro)
        ix = torch.randint(len(corpus) - BLOCK - 1, (batch_size,), generator=g)
        x = torch.stack([corpus[i : i + BLOCK] for i in ix])
        y = torch.stack([corpus[i + 1 : i + 1 + BLOCK] for i in ix])
        return x, y

    def get_lr(it: int) -> float:
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        ratio = (it - warmup_iters) / max(1, args.max_iters - warmup_iters)
        return learning_rate * (0.1 + 0.45 * (1.0 + math.cos(math.pi * ratio)))

    iter_num = 0
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    model = GPT()
    if args.init_from == "resume":
        checkpoint = torch.load(ckpt_path, map_location=device)
        state_dict = checkpoint["model"]
        unwanted_prefix = "_orig_mod."
        for k in list(state_dict):
            if k.startswith(unwanted_prefix):
                state_dict[k[len(unwanted_prefix) :]] = state_dict.pop(k)
        model.load_state_dict(state_dict)
        iter_num = checkpoint["iter_num"]
    model.to(device)
    scaler = torch.amp.GradScaler(device, enabled=False)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (0.9, 0.95), args.optimizer)
    if args.init_from == "resume":
        optimizer.load_state_dict(checkpoint["optimizer"])
        checkpoint = None
    if args.compile:
        model = torch.compile(model)
    model = DDP(model)
    raw_model = model.module

    @torch.no_grad()
    def estimate_loss() -> float:
        model.eval()
        losses = [model(*get_batch(-1 - k, 0)).item() for k in range(2)]
        model.train()
        return sum(losses) / len(losses)

    X, Y = get_batch(iter_num, 0)
    while True:
        lr = get_lr(iter_num)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        if iter_num % args.eval_interval == 0 and master_process:
            print(f"step {iter_num}: val loss {estimate_loss():.4f}", flush=True)
            if iter_num > 0:
                checkpoint = {
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "iter_num": iter_num,
                }
                torch.save(checkpoint, ckpt_path)
        for micro_step in range(gradient_accumulation_steps):
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
            loss = model(X, Y) / gradient_accumulation_steps
            X, Y = get_batch(iter_num, micro_step + 1)
            scaler.scale(loss).backward()
        if args.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            if master_process:
                print(f"iter {iter_num}: grad norm {norm.item():.6f}", flush=True)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        X, Y = get_batch(iter_num, 0)
        if iter_num >= args.max_iters:
            break

    write_result(args.out, raw_model.named_parameters(), estimate_loss())
    exit_cleanly()


if __name__ == "__main__":
    main()
