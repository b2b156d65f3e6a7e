"""trace.png: the figure reads honestly (bars from 0, error bars, lens accuracy on its own
axis, at most two series per axis, the cut labelled) for classification and SFT traces."""

from __future__ import annotations

import matplotlib.image
import matplotlib.pyplot as plt
import pytest
from matplotlib.container import BarContainer

from salf.analysis import Trace, choose_cut, fit_depth_law
from salf.plan import FreezePlan
from salf.report.plots import plot_trace, trace_figure, write_trace_plot

L = 30


def series(lens: bool = True, se: bool = True, fitted: bool = False) -> dict:
    """Figure inputs shaped like a 30-layer trace: D falls from 1.0 to 0.8."""
    deviation = [1.0 - 0.2 * (l / L) ** 2 for l in range(L + 1)]
    return dict(
        title="test-model on test-data — policy max-gain: eof = 20",
        deviation=deviation, gains=[a - b for a, b in zip(deviation, deviation[1:])], eof=20,
        cost=[1.0 - 0.6 * k / L for k in range(L)], benefit=[0.1 * k / L for k in range(L)],
        deviation_se=[0.01] * (L + 1) if se else None,
        fitted=[0.8 + 0.2 / (l + 1) for l in range(L + 1)] if fitted else None, fit_r2=0.9,
        lens_accuracy=[0.5 + 0.4 * l / L for l in range(L + 1)] if lens else None, chance=0.5)


@pytest.fixture
def figure():
    figs = []

    def make(**kw):
        figs.append(trace_figure(**series(**kw)))
        return figs[-1]

    yield make
    for f in figs:
        plt.close(f)


def test_deviation_bars_start_at_zero_with_error_bars(figure):
    ax = figure().axes[0]
    assert ax.get_ylim()[0] == 0.0             # not zoomed onto the range of D
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    assert len(bars) == L + 1 and bars.errorbar is not None
    assert [p.get_y() for p in bars] == [0.0] * (L + 1)


def test_lens_accuracy_has_its_own_axis(figure):
    cls, sft = figure(), figure(lens=False)
    assert len(cls.axes) == len(sft.axes) + 1
    lens_ax = cls.axes[2]
    assert lens_ax.get_ylim()[0] == 0.0 and lens_ax.get_ylim()[1] >= 1.0
    lens = series()["lens_accuracy"]
    assert any(list(line.get_ydata()) == lens for line in lens_ax.get_lines())
    for ax in (cls.axes[0], cls.axes[1], cls.axes[3]):  # never on the deviation's (or any other) y axis
        assert all(list(line.get_ydata()) != lens for line in ax.get_lines())


def test_at_most_two_series_per_axis(figure):
    for ax in figure(fitted=True).axes:
        legend = ax.get_legend()
        if legend is not None:
            assert len(legend.get_texts()) <= 2


def test_every_space_has_a_tick_and_the_cut_is_labelled(figure):
    fig = figure()
    bottom_left = fig.axes[2]
    assert list(bottom_left.get_xticks()) == list(range(L + 1))
    cost_ax = fig.axes[-1]
    labels = [t.get_text() for t in cost_ax.texts]
    assert labels[0] == "20"                    # the chosen cut is labelled first, always
    assert len(labels) > 5                      # and other cuts where they fit


@pytest.mark.parametrize("lens,se", [(True, True), (False, False), (True, False)])
def test_plot_trace_writes_a_png(tmp_path, lens, se):
    path = plot_trace(tmp_path / "trace.png", **series(lens=lens, se=se, fitted=not se))
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 500 and image.shape[1] > 1000
    assert image[..., :3].std() > 0.05          # not a blank canvas


def _trace(task: str, with_se: bool) -> Trace:
    deviation = [1.0 - 0.3 * (1 - 1 / (l + 1)) for l in range(5)]
    spaces = [{"space": l, "deviation": d, "deviation_se": 0.01 if with_se else None,
               "lens_acc": 0.5 + 0.1 * l if task == "classification" else None}
              for l, d in enumerate(deviation)]
    return Trace.from_dict({"model": {"spec": "m"}, "data": {"dataset": "d"}, "task": task,
                            "num_layers": 4, "spaces": spaces,
                            "settings": {"label_token_ids": [5, 6]}})


@pytest.mark.parametrize("task,with_se", [("classification", True), ("sft", False)])
def test_write_trace_plot_from_a_trace(tmp_path, task, with_se):
    """Old traces have no deviation_se; SFT traces no lens accuracy: both still plot."""
    tr = _trace(task, with_se)
    cost = {"cuts": [{"flops_ratio": 1.0 - 0.15 * k} for k in range(5)]}
    choice = choose_cut(tr, "max-gain", cost=[c["flops_ratio"] for c in cost["cuts"]])
    plan = FreezePlan.manual(choice["eof"], 4)
    path = write_trace_plot(tmp_path / "trace.png", tr, plan, choice, cost, fit_depth_law(tr))
    assert path.stat().st_size > 10_000
