"""Plots: what is drawn is the recorded data and the given predictions."""

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from tolerances import assert_approximately  # noqa: E402

from optax_sphere import GeometryStats, History, plots  # noqa: E402


def _history(steps=12, units=5):
    """A synthetic run: layer 'a' balanced, layer 'b' imbalanced (unit j rotates j+1 times
    faster)."""
    rng = np.random.default_rng(0)
    hist = History()
    for k in range(steps):
        ang = {
            "a": jnp.full((units,), 0.01) * (1 + 0.01 * rng.normal(size=units)),
            "b": jnp.asarray(0.001 * np.arange(1, units + 1) * (1 + 0.01 * rng.normal())),
        }
        rad = {"a": jnp.full((units,), 1.0 + k), "b": jnp.full((units,), 2.0)}
        fields = {name: rad for name in GeometryStats._fields}
        fields["angular_update"] = ang
        fields["effective_lr"] = fields["direction_norm"] = None
        fields["radial_gradient"] = None  # recorded by monitored() only
        hist.record(k, GeometryStats(**fields))
    return hist


def test_smooth():
    x = np.arange(6.0)
    np.testing.assert_allclose(plots.smooth(x, 3)[2:], [1, 2, 3, 4])
    assert np.isnan(plots.smooth(x, 3)[:2]).all()
    np.testing.assert_array_equal(plots.smooth(x, 1), x)
    assert plots.smooth(np.ones((4, 2)), 2).shape == (4, 2)


def test_angular_updates_draw_each_layer_and_the_predictions():
    hist = _history()
    ax = plots.plot_angular_updates(hist, prediction={"a": 0.02, "b": np.full(12, 0.003)})
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert [ln.get_label() for ln in solid] == ["a", "b"]
    np.testing.assert_allclose(solid[1].get_ydata(), hist.series("b", "angular_update"))
    assert sorted(float(np.mean(ln.get_ydata())) for ln in dashed) == pytest.approx([0.003, 0.02])
    assert ax.get_yscale() == "log"
    ax = plots.plot_angular_updates(hist, prediction=0.005, window=4, log=False)
    (pred,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert pred.get_label() == "prediction" and pred.get_ydata()[0] == 0.005
    ys = ax.get_lines()[0].get_ydata()
    assert np.isnan(ys[:3]).all() and np.isfinite(ys[3:]).all()
    with pytest.raises(ValueError, match="one value per recorded step"):
        plots.plot_angular_updates(hist, prediction=np.ones(3))


def test_unit_panel_shows_the_spread_of_units():
    hist = _history()
    ax = plots.plot_unit_angular_updates(hist, "b", prediction=0.003, max_units=3)
    (band,) = ax.collections
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    # the synthetic units turn by 0.001 to 0.005 each step, with noise
    assert_approximately([low, high], [0.001, 0.005], rel=0.05)
    mean = [ln for ln in ax.get_lines() if ln.get_label() == "layer mean"][0]
    np.testing.assert_allclose(mean.get_ydata(), hist.series("b", "angular_update"), rtol=1e-6)
    assert len(ax.get_lines()) == 3 + 2  # three units, the mean, the prediction
    lo, mid, hi = hist.unit_spread("b")
    assert_approximately([hi / lo, mid], [5, 0.003], rel=0.05)
    lo, _, hi = hist.unit_spread("a")
    assert hi / lo < 1.1


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_geometry_figure_is_saved(tmp_path, suffix):
    runs = {"one": _history(), "two": _history(8)}
    path = tmp_path / f"geometry.{suffix}"
    fig = plots.geometry_figure(
        runs,
        predictions={"one": {"a": 0.01, "b": 0.003}, "two": 0.004},
        norm_predictions={"one": {"a": 5.0}},
        unit_layer="b",
        window=2,
        path=str(path),
    )
    assert path.stat().st_size > 1000
    axes = fig.get_axes()
    assert len(axes) == 6
    assert axes[2].get_title() == "one: units of b"
    norm_lines = axes[1].get_lines()
    np.testing.assert_allclose(norm_lines[0].get_ydata(), 1.0 + np.arange(12))
    assert any(ln.get_linestyle() == "--" and ln.get_ydata()[0] == 5.0 for ln in norm_lines)
    # the per-layer prediction of the unit layer is drawn on the unit panel
    assert any(ln.get_linestyle() == "--" for ln in axes[2].get_lines())


def test_equal_per_layer_predictions_draw_one_line():
    ax = plots.plot_angular_updates(_history(), prediction={"a": 0.01, "b": 0.01})
    (pred,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert pred.get_label() == "prediction" and pred.get_ydata()[0] == 0.01
