"""A LightningModule trained the usual way: ``configure_optimizers`` returns the optimizer
and an LR scheduler, the Trainer clips (``gradient_clip_val``), accumulates two batches per
step, and ``ModelCheckpoint`` saves after every epoch; ``--fp16`` adds 16-mixed precision
with a loss scaler (on CPU, passed as a precision plugin); ``--resume`` continues from a saved
checkpoint with ``trainer.fit(ckpt_path=...)``.

The lines that differ between ``--optimizer sharded`` and ``--optimizer adamw``: the optimizer
class in ``configure_optimizers`` and ``strategy=ShardedDDPStrategy()`` in place of ``"ddp"``.

``--grad-norms`` logs per-layer gradient norms the documented way, ``grad_norm(self, 2)`` in
``on_before_optimizer_step``, and saves them with the result.

``--package pytorch_lightning`` runs the same program on the ``pytorch_lightning`` package
(``import pytorch_lightning as pl``) with its strategy, ``PLShardedDDPStrategy``, in place of
the unified ``lightning.pytorch``; that run checks it never imported ``lightning``.

    torchrun --standalone --nproc_per_node 2 -m tests.clients.lightning_client --optimizer sharded
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from sharded_adamw import ShardedAdamW
from sharded_adamw.integrations import lightning as integration
from tests.clients.report import exit_cleanly, write_result

VOCAB, SEQ = 48, 8
# --package: the module imported as ``pl``, and the strategy for its Trainer
PACKAGES = {
    "lightning": ("lightning.pytorch", "ShardedDDPStrategy"),
    "pytorch_lightning": ("pytorch_lightning", "PLShardedDDPStrategy"),
}


def tiny_lm(pl):
    """The LightningModule class, built on ``pl.LightningModule`` of the package chosen."""

    grad_norm = importlib.import_module(f"{pl.__name__}.utilities").grad_norm

    class TinyLM(pl.LightningModule):
        def __init__(self, optimizer: str):
            super().__init__()
            self.optimizer_name = optimizer
            self.norms: list[dict] = []
            self.embed = nn.Embedding(VOCAB, 24)
            self.mix = nn.Linear(24, 40)
            self.norm = nn.LayerNorm(40)
            self.head = nn.Linear(40, VOCAB)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            h = self.norm(F.gelu(self.mix(self.embed(x))))
            return F.cross_entropy(self.head(h).view(-1, VOCAB), y.view(-1))

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self(*batch)

        def configure_optimizers(self):
            cls = ShardedAdamW if self.optimizer_name == "sharded" else torch.optim.AdamW
            optimizer = cls(self.parameters(), lr=2e-2, weight_decay=0.1)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
            schedule = {"scheduler": scheduler, "interval": "step"}
            return {"optimizer": optimizer, "lr_scheduler": schedule}

    class WithGradNorms(TinyLM):
        def on_before_optimizer_step(self, optimizer) -> None:
            self.norms.append({k: v.clone() for k, v in grad_norm(self, norm_type=2).items()})

    return TinyLM, WithGradNorms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--package", choices=sorted(PACKAGES), default="lightning")
    ap.add_argument("--optimizer", choices=["sharded", "adamw"], required=True)
    ap.add_argument("--out", required=True, help="final parameters and loss go to OUT.rank<r>")
    ap.add_argument("--ckpt-dir", required=True, help="ModelCheckpoint writes epoch=<e>.ckpt here")
    ap.add_argument("--resume", help="a checkpoint to continue from")
    ap.add_argument("--gradient-clip-val", type=float, default=0.5, help="0 disables clipping")
    ap.add_argument("--gradient-clip-algorithm", choices=["norm", "value"], default="norm")
    ap.add_argument("--fp16", action="store_true", help="16-mixed with a loss scaler")
    ap.add_argument("--max-epochs", type=int, default=2)
    ap.add_argument("--grad-norms", action="store_true", help="log grad_norm(self, 2)")
    args = ap.parse_args()
    package, strategy_name = PACKAGES[args.package]
    pl = importlib.import_module(package)
    ShardedDDPStrategy = getattr(integration, strategy_name)
    ModelCheckpoint = importlib.import_module(f"{package}.callbacks").ModelCheckpoint
    MixedPrecision = importlib.import_module(f"{package}.plugins.precision").MixedPrecision

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (64, SEQ), generator=g)
    loader = DataLoader(TensorDataset(x, torch.roll(x, 1, dims=1)), batch_size=4)
    model = tiny_lm(pl)[1 if args.grad_norms else 0](args.optimizer)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ShardedDDPStrategy() if args.optimizer == "sharded" else "ddp",
        max_epochs=args.max_epochs,
        gradient_clip_val=args.gradient_clip_val,
        gradient_clip_algorithm=args.gradient_clip_algorithm,
        plugins=[MixedPrecision("16-mixed", "cpu")] if args.fp16 else None,
        accumulate_grad_batches=2,
        callbacks=[ModelCheckpoint(dirpath=args.ckpt_dir, filename="{epoch}", save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=loader, ckpt_path=args.resume)
    model.eval()
    with torch.no_grad():
        loss = model(x[:16], torch.roll(x, 1, dims=1)[:16]).item()
    if args.package == "pytorch_lightning" and "lightning" in sys.modules:
        raise RuntimeError("a pytorch_lightning run imported the unified lightning package")
    write_result(args.out, model.named_parameters(), loss, norms=model.norms)
    exit_cleanly()


if __name__ == "__main__":
    main()
