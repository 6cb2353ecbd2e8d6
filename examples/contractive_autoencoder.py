"""A plain and a contractive auto-encoder on scikit-learn's digits, trained with Lightning.

The contractive auto-encoder (Rifai et al., ICML 2011) adds lambda * ||J_f(x)||_F^2, the squared
Frobenius norm of the encoder's Jacobian, to the reconstruction loss. On held-out digits this
script reports, for both models:

* the mean encoder Jacobian norm ||J_f(x)||_F (the CAE's must be clearly lower);
* the singular-value spectrum of J_f(x) (the CAE keeps few large directions: the tangent
  directions of the data, and contracts the rest);
* the reconstruction error, the fraction of saturated hidden units;
* the accuracy of a logistic-regression probe on the learned features.

It prints a table and saves a figure to ``--out`` (default ``outputs/contractive``).

    python examples/contractive_autoencoder.py            # about a minute on 2 CPU cores
    python examples/contractive_autoencoder.py --quick    # a few seconds (CI)
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from nncurv.contractive import ContractiveLoss  # noqa: E402
from nncurv.jacobians import jacobian_frobenius_sq, singular_values  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")
for _name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class AutoEncoder(pl.LightningModule):
    """Sigmoid encoder and decoder; ``weight > 0`` makes it contractive."""

    def __init__(self, d_in: int, d_hidden: int, weight: float, method: str, lr: float) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, d_hidden), nn.Sigmoid())
        self.decoder = nn.Sequential(nn.Linear(d_hidden, d_in), nn.Sigmoid())
        self.contractive = ContractiveLoss(weight, method=method) if weight > 0 else None
        self.lr = lr

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        loss = nn.functional.binary_cross_entropy(self.decoder(self.encoder(x)), x)
        if self.contractive is not None:
            loss = loss + self.contractive(self.encoder, x)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def train(
    x_train: torch.Tensor, *, weight: float, args: argparse.Namespace, seed: int
) -> AutoEncoder:
    pl.seed_everything(seed, verbose=False)
    model = AutoEncoder(x_train.shape[1], args.hidden, weight, args.method, args.lr)
    loader = DataLoader(TensorDataset(x_train), batch_size=args.batch_size, shuffle=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return model.cpu().eval()


@torch.no_grad()
def evaluate(
    model: AutoEncoder, x_tr: torch.Tensor, y_tr, x_te: torch.Tensor, y_te
) -> dict[str, object]:
    enc = model.encoder
    frob = jacobian_frobenius_sq(enc, x_te).value.sqrt()
    sv = singular_values(enc, x_te)  # (N, min(d_in, d_hidden)), descending
    h_te, h_tr = enc(x_te), enc(x_tr)
    recon = nn.functional.mse_loss(model.decoder(h_te), x_te).item()
    sat = ((h_te < 0.05) | (h_te > 0.95)).float().mean().item()
    probe = LogisticRegression(max_iter=2000).fit(h_tr.numpy(), y_tr)
    rel = sv / sv[:, :1]
    return {
        "jac_fro": frob.mean().item(),
        "jac_fro_se": (frob.std() / frob.numel() ** 0.5).item(),
        "sigma1": sv[:, 0].mean().item(),
        "n_large": (rel > 0.1).sum(1).float().mean().item(),
        "recon": recon,
        "sat": sat,
        "probe": probe.score(h_te.numpy(), y_te),
        "spectrum": sv.mean(0),
        "frob_all": frob,
        "estimators": estimator_errors(enc, x_te, frob.square()),
    }


def estimator_errors(enc: nn.Module, x: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Relative RMS error of the stochastic ||J_f||_F^2 estimators at 9 and 60 products."""
    out = {}
    for budget in (9, 60):
        for method in ("hutchinson", "hutch++"):
            est = jacobian_frobenius_sq(enc, x, method=method, num_probes=budget, seed=1).value
            out[f"{method}@{budget}"] = ((est - exact) / exact).square().mean().sqrt().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--weight", type=float, default=0.01, help="CAE penalty weight lambda")
    p.add_argument(
        "--method", default="auto", choices=["auto", "closed_form", "exact", "hutchinson"]
    )
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="tiny run for CI (2 epochs)")
    p.add_argument("--out", type=Path, default=Path("outputs/contractive"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.epochs = min(args.epochs, 2)
    torch.set_num_threads(1)  # tiny matrices: a second thread buys nothing and suffers from load
    args.out.mkdir(parents=True, exist_ok=True)

    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        X, digits.target, test_size=0.33, random_state=args.seed, stratify=digits.target
    )
    start = time.perf_counter()
    results = {}
    for name, weight in [("AE", 0.0), ("CAE", args.weight)]:
        model = train(x_tr, weight=weight, args=args, seed=args.seed)
        results[name] = evaluate(model, x_tr, y_tr, x_te, y_te)
    raw = LogisticRegression(max_iter=2000).fit(x_tr.numpy(), y_tr).score(x_te.numpy(), y_te)

    print(
        f"\nscikit-learn digits: {len(x_tr)} train / {len(x_te)} held-out, 64 -> "
        f"{args.hidden} sigmoid units, {args.epochs} epochs, CAE lambda={args.weight} "
        f"(method={args.method})\n"
    )
    header = (
        f"{'model':<6}{'mean ||J_f||_F':>18}{'mean sigma_1':>14}{'#sv > 0.1 sigma_1':>19}"
        f"{'recon MSE':>11}{'saturated':>11}{'probe accuracy':>16}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<6}{r['jac_fro']:>11.4f} ± {r['jac_fro_se']:.4f}{r['sigma1']:>14.4f}"
            f"{r['n_large']:>19.1f}{r['recon']:>11.4f}{r['sat']:>10.1%}{r['probe']:>16.3f}"
        )
    print(f"{'pixels':<6}{'':>18}{'':>14}{'':>19}{'':>11}{'':>11}{raw:>16.3f}")
    ratio = results["AE"]["jac_fro"] / results["CAE"]["jac_fro"]  # type: ignore[operator]
    print(
        "\nStochastic ||J_f(x)||_F^2 per sample: relative RMS error "
        "(in brackets: Hutch++ variance / Hutchinson variance)"
    )
    for name, r in results.items():
        e: dict[str, float] = r["estimators"]  # type: ignore[assignment]
        cells = [
            f"{b:>2} products: Hutchinson {e[f'hutchinson@{b}']:.3f}, Hutch++ "
            f"{e[f'hutch++@{b}']:.3f} ({(e[f'hutch++@{b}'] / e[f'hutchinson@{b}']) ** 2:.2f}x)"
            for b in (9, 60)
        ]
        print(f"{name:<6}" + "   ".join(cells))
    print(
        f"\nCAE contracts {ratio:.1f}x more than AE (mean Jacobian Frobenius norm on held-out data)"
    )

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    all_frob = torch.cat([r["frob_all"] for r in results.values()])  # type: ignore[misc]
    bins = torch.logspace(all_frob.min().log10(), all_frob.max().log10(), 40).numpy()
    for name, r in results.items():
        s = r["spectrum"] / r["spectrum"][0]  # type: ignore[index,operator]
        axes[0].semilogy(range(1, len(s) + 1), s.numpy(), marker="o", ms=3, label=name)
        axes[1].hist(r["frob_all"].numpy(), bins=bins, alpha=0.6, label=name)  # type: ignore[union-attr]
    axes[0].set(
        xlabel="index k",
        ylabel="mean sigma_k / mean sigma_1 (held-out)",
        title="Encoder Jacobian spectrum",
        ylim=(1e-4, 1.5),
    )
    axes[1].set(
        xscale="log", xlabel="||J_f(x)||_F", ylabel="held-out samples", title="Jacobian norms"
    )
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    path = args.out / "contractive_autoencoder.png"
    fig.savefig(path, dpi=120)
    print(f"figure: {path}   ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
