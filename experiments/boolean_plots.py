"""Plots of the Boolean FPE sweep: accuracy vs clauses and vs neurons, metrics vs gain."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPLIT_COLORS = {"dense": "black", "random": "tab:green", "clause": "tab:orange",
                "feature": "tab:blue", "overlap": "tab:red", "block": "tab:purple"}
ALPHA_STYLES = {1: "--", 2: "-", 4: ":"}


def _style(arm):
  """The same color per split and line style per alpha in every plot."""
  split, _, alpha = arm.partition(" α=")
  return {"color": SPLIT_COLORS.get(split, "tab:gray"),
          "linestyle": ALPHA_STYLES.get(int(alpha or 1), "-.")}


def _arm(p):
  return "dense" if p["split"] == "dense" else f"{p['split']} α={p['alpha']}"


def _arms(points):
  return sorted({_arm(p) for p in points}, key=lambda a: (a != "dense", a))


def accuracy_vs(points, x_key: str, panel_key: str, path: str) -> None:
  """One panel per value of `panel_key`, accuracy vs `x_key`, a line per arm (± std)."""
  panels = sorted({p[panel_key] for p in points})
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False,
                           sharey=True)
  for ax, panel in zip(axes[0], panels, strict=True):
    for arm in _arms(points):
      rows = sorted((p for p in points if p[panel_key] == panel and _arm(p) == arm),
                    key=lambda p: p[x_key])
      if rows:
        ax.errorbar([p[x_key] for p in rows], [100 * p["accuracy"]["mean"] for p in rows],
                    yerr=[100 * p["accuracy"]["std"] for p in rows], marker="o", capsize=3,
                    label=arm, **_style(arm))
    ax.set_xscale("log", base=2)
    ax.set_title(f"{panel_key} = {panel}")
    ax.set_xlabel(x_key)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("test accuracy (%)")
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def metrics_vs_gain(points, path: str) -> None:
  """Fold change of capacity and of mean |cos| against the accuracy gain over dense."""
  rows = [p for p in points if "accuracy_gain" in p]
  if not rows:
    return
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, key, label in ((axes[0], "capacity_fold", "capacity (FPE / dense)"),
                         (axes[1], "abs_cosine_fold", "mean |cos| (FPE / dense)")):
    for arm in _arms(rows):
      sel = [p for p in rows if _arm(p) == arm]
      ax.scatter([100 * p["accuracy_gain"]["mean"] for p in sel],
                 [p[key]["mean"] for p in sel], label=arm, color=_style(arm)["color"],
                 marker="o" if arm.endswith("α=2") else "s")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("accuracy gain over dense (points)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_all(points, folder: str) -> list[str]:
  os.makedirs(folder, exist_ok=True)
  paths = [os.path.join(folder, name) for name in
           ("accuracy_vs_clauses.png", "accuracy_vs_neurons.png", "metrics_vs_gain.png")]
  accuracy_vs(points, "clauses", "neurons", paths[0])
  accuracy_vs(points, "neurons", "clauses", paths[1])
  metrics_vs_gain(points, paths[2])
  return [p for p in paths if os.path.exists(p)]
