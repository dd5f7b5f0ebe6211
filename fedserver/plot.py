"""PNG curves of per-round metrics from the history database (matplotlib, Agg canvas, no display needed).

``plot_history``: one subplot per metric, a thin line per node and the thick global (aggregated) curve.
``compare_experiments``: the global curves of several experiments overlaid (e.g. Scaffold vs FedAvg).
Figures are built on a private ``Figure`` with an Agg canvas rather than through ``pyplot``, so no global
state or GUI backend is touched and plotting from a server thread is safe.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedcore.errors import HistoryError
from fedserver.history import HistoryStore

__all__ = ["available_metrics", "compare_experiments", "plot_history", "sources_with_values"]

#: Beyond this many nodes, node curves are drawn in grey under one legend entry.
MAX_LABELLED_NODES = 12
_DPI = 110


def available_metrics(history: HistoryStore, experiment_id: int, source: str = "training") -> list[str]:
    """Names of the numeric metrics recorded for an experiment (node ``source`` metrics and global ones)."""
    names: set[str] = set()
    attribute = "training_metrics" if source == "training" else source
    for record in history.node_results(experiment_id):
        metrics = getattr(record, attribute) or {}
        names.update(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    for record in history.rounds(experiment_id):
        names.update(
            k for k, v in record.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        )
    return sorted(names)


def _check_metrics(metrics: Sequence[str]) -> list[str]:
    if isinstance(metrics, str) or not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise HistoryError(f"metrics must be a non-empty sequence of metric names, got {metrics!r}")
    return list(metrics)


def _new_figure(columns: int) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(5.5 * columns, 4.2), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _style(ax: Axes, metric: str, has_data: bool) -> None:
    ax.set_title(metric)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if has_data:
        ax.legend(fontsize="small", loc="best")
    else:
        ax.text(0.5, 0.5, f"no values for {metric!r}", ha="center", va="center", transform=ax.transAxes)


def _save(figure: Figure, out_path: str | os.PathLike[str]) -> Path:
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def plot_history(
    history: HistoryStore,
    experiment_id: int,
    out_path: str | os.PathLike[str],
    metrics: Sequence[str] = ("loss", "accuracy"),
    source: str | Mapping[str, str] = "training",
) -> Path:
    """Write a PNG with, per metric, each node's per-round curve and the global curve; returns the path.

    Node values come from ``source`` ('training', 'validation_before' or 'validation_after') of the
    succeeded replies, or each metric's own source when ``source`` maps metric names to sources (as
    :func:`sources_with_values` does; a subplot whose source is not the first metric's names it); the global
    curve from the rounds' aggregated metrics of that source (``loss`` of 'training' is the rounds'
    ``train_loss``). Raises HistoryError when none of ``metrics`` has a value, listing the metrics that do.
    """
    names = _check_metrics(metrics)
    sources = {m: source for m in names} if isinstance(source, str) else {m: source.get(m, "training") for m in names}
    experiment = history.experiment(experiment_id)
    per_metric = [
        (m, history.metric_series(experiment_id, m, sources[m]),
         _global_series(history, experiment_id, m, sources[m]))
        for m in names
    ]
    if not any(nodes or overall for _, nodes, overall in per_metric):
        recorded = sorted({name for s in set(sources.values()) for name in available_metrics(history, experiment_id, s)})
        raise HistoryError(
            f"experiment {experiment_id} has no values for {names}; "
            f"metrics recorded: {recorded}"
        )
    figure, axes = _new_figure(len(names))
    for ax, (metric, nodes, overall) in zip(axes, per_metric):
        many = len(nodes) > MAX_LABELLED_NODES
        for index, (node_id, points) in enumerate(nodes.items()):
            rounds, values = zip(*points)
            if many:
                label = f"nodes ({len(nodes)})" if index == 0 else None
                ax.plot(rounds, values, color="0.6", linewidth=0.8, alpha=0.6, label=label)
            else:
                ax.plot(rounds, values, marker="o", markersize=3, linewidth=1.0, alpha=0.8, label=node_id)
        if overall:
            rounds, values = zip(*overall)
            ax.plot(rounds, values, color="black", linewidth=2.5, marker="s", markersize=4, label="global")
        shown = metric if sources[metric] == sources[names[0]] else f"{metric} ({sources[metric]})"
        _style(ax, shown, bool(nodes or overall))
    figure.suptitle(f"experiment {experiment.id}: {experiment.name} ({sources[names[0]]} metrics per node)")
    return _save(figure, out_path)


#: Where :func:`sources_with_values` looks for a metric, in order: what the nodes trained on, then validation.
SOURCE_ORDER = ("training", "validation_after", "validation_before")


def sources_with_values(
    history: HistoryStore, experiment_id: int | Sequence[int], metrics: Sequence[str]
) -> dict[str, str]:
    """Each metric's source for :func:`plot_history` (or :func:`compare_experiments`, given several experiment
    ids) when none is chosen: the first of :data:`SOURCE_ORDER` holding a value of it (node or global) in any
    of the experiments, e.g. ``accuracy`` -> 'validation_after' for a plan that reports accuracy only on
    validation (a 'training' plot of it was an empty panel); 'training' when none does."""
    ids = [experiment_id] if isinstance(experiment_id, int) else list(experiment_id)
    chosen = {}
    for metric in _check_metrics(metrics):
        chosen[metric] = next((source for source in SOURCE_ORDER
                               if any(history.metric_series(e, metric, source)
                                      or _global_series(history, e, metric, source) for e in ids)), "training")
    return chosen


def compare_experiments(
    history: HistoryStore,
    experiment_ids: Sequence[int],
    out_path: str | os.PathLike[str],
    metrics: Sequence[str] = ("loss", "accuracy"),
    source: str | Mapping[str, str] | None = None,
) -> Path:
    """Write a PNG overlaying the global curves of experiments, a subplot per metric; returns the path.

    A metric is a round-level name (``train_loss``, ``val_after_accuracy``) or a node metric name, which
    means its aggregate of ``source`` (``loss`` of 'training': ``train_loss``; ``accuracy`` of
    'validation_after': ``val_after_accuracy``), or each metric's own source when ``source`` maps metric
    names to sources; None (the default) takes :func:`sources_with_values` over all the experiments, so a
    metric the nodes report only on validation is drawn from there. Each subplot is titled with the names it
    shows. Raises HistoryError when no metric has a value, listing the global metrics recorded."""
    names = _check_metrics(metrics)
    if isinstance(experiment_ids, (str, int)) or not experiment_ids:
        raise HistoryError(f"experiment_ids must be a non-empty sequence of ids, got {experiment_ids!r}")
    experiments = [history.experiment(experiment_id) for experiment_id in experiment_ids]
    if source is None:
        sources = sources_with_values(history, [e.id for e in experiments], names)
    else:
        sources = {m: source for m in names} if isinstance(source, str) else {m: source.get(m, "training")
                                                                             for m in names}
    for chosen in set(sources.values()):
        if chosen not in _ROUND_PREFIX:
            raise HistoryError(f"metric source must be one of {list(_ROUND_PREFIX)}, got {chosen!r}")
    resolved = {(e.id, m): _compared_series(history, e.id, m, sources[m]) for e in experiments for m in names}
    series = {key: points for key, (_, points) in resolved.items()}
    if not any(series.values()):
        recorded = sorted({name for e in experiments for r in history.rounds(e.id)
                           for name, value in r.metrics.items()
                           if isinstance(value, (int, float)) and not isinstance(value, bool)})
        raise HistoryError(
            f"experiments {list(experiment_ids)} have no global values for {names}; "
            f"global metrics recorded: {recorded}"
        )
    figure, axes = _new_figure(len(names))
    for ax, metric in zip(axes, names):
        shown = sorted({resolved[(e.id, metric)][0] for e in experiments if series[(e.id, metric)]})
        for experiment in experiments:
            points = series[(experiment.id, metric)]
            if points:
                rounds, values = zip(*points)
                ax.plot(
                    rounds,
                    values,
                    marker="o",
                    markersize=3,
                    linewidth=2.0,
                    label=f"#{experiment.id} {experiment.name}",
                )
        _style(ax, " / ".join(shown) or metric, bool(shown))
    figure.suptitle("global metrics per round: " + " vs ".join(f"#{e.id} {e.name}" for e in experiments))
    return _save(figure, out_path)


#: The prefix of the rounds' aggregated metrics (``fedserver.rounds.round_metrics``) for each node source.
_ROUND_PREFIX = {"training": "train_", "validation_before": "val_before_", "validation_after": "val_after_"}


def _compared_series(history: HistoryStore, experiment_id: int, metric: str, source: str) -> tuple[str, list]:
    """The round-level name and series ``compare_experiments`` shows for ``metric`` of ``source``: its
    aggregate (``loss`` of 'training': ``train_loss``), else ``metric`` itself as a round-level name (the
    same series as :func:`_global_series`, with the name it was found under)."""
    for name in (_ROUND_PREFIX[source] + metric, metric):
        points = history.global_series(experiment_id, name)
        if points:
            return name, points
    return metric, []


def _global_series(history: HistoryStore, experiment_id: int, metric: str, source: str) -> list:
    """The rounds' aggregate of ``metric`` as nodes name it in ``source`` (``loss`` -> ``train_loss``), or of
    ``metric`` itself when it is already a round-level name."""
    prefixed = history.global_series(experiment_id, _ROUND_PREFIX.get(source, "") + metric)
    return prefixed or history.global_series(experiment_id, metric)
