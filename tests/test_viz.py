"""Pictures a person reads without the code: column headers, colour keys, curves."""

from __future__ import annotations

import json

import numpy as np

from fourm.viz import PLOT_COLOURS, _PALETTE, grid, line_chart, semseg_legend


def _has_colour(img: np.ndarray, colour) -> bool:
    return bool((img.reshape(-1, 3) == np.asarray(colour, np.uint8)).all(1).any())


def test_grid_headers_add_a_titled_band_above_each_column():
    cells = [[np.zeros((20, 30, 3), np.uint8), np.zeros((20, 50, 3), np.uint8)]]
    plain, titled = grid(cells), grid(cells, headers=["input", "model"])
    assert titled.shape[1] == plain.shape[1] and titled.shape[0] == plain.shape[0] + 16 + 2
    band = titled[2:18, 2:32]
    assert _has_colour(band, (235, 235, 235)) and band.max(-1).min() < 128  # grey band with dark text


def test_semseg_legend_shows_each_class_colour():
    legend = semseg_legend(["background", "ground", "sphere", "cube", "cylinder"], 600)
    for i in range(5):
        assert _has_colour(legend, _PALETTE[i]), i
    assert not _has_colour(legend, _PALETTE[6])
    narrow = semseg_legend(["background", "ground", "sphere", "cube", "cylinder"], 150)
    assert narrow.shape[0] > legend.shape[0]  # wrapped onto more lines


def test_line_chart_draws_each_series_and_skips_missing_points():
    panels = [{"title": "a", "x_max": 10, "x_unit": "steps", "series": [(0, [(0, 1.0), (5, 0.5), (10, 0.25)])]},
              {"title": "b", "x_max": 10, "x_unit": "steps", "log_y": True, "series": [(2, [(0, None), (5, float("nan")), (10, 0.0)])]}]
    img = line_chart(panels, ["loss", "unused", "empty"], panel=(200, 150))
    assert img.shape[1] == 400
    assert _has_colour(img[:, :200], PLOT_COLOURS[0]) and not _has_colour(img[:150, 200:], PLOT_COLOURS[2])  # b has no drawable point
    assert _has_colour(img[150:], PLOT_COLOURS[2])  # but its legend entry is there


def test_demo_loss_picture_from_the_runs_histories(tmp_path):
    from fourm.demo import plot_losses

    assert plot_losses(tmp_path, tmp_path / "losses.png") is False and not (tmp_path / "losses.png").exists()
    (tmp_path / "tokenizers" / "rgb").mkdir(parents=True)
    (tmp_path / "tokenizers" / "rgb" / "train_history.json").write_text(json.dumps({"loss": list(np.linspace(1, 0.1, 300))}))
    (tmp_path / "train").mkdir()
    rows = [{"step": s, "loss": 5.0 / s, "loss/depth": 4.0 / s} for s in range(10, 210, 10)]
    (tmp_path / "train" / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    assert plot_losses(tmp_path, tmp_path / "losses.png")
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "losses.png").convert("RGB"))
    assert img.shape[1] == 2 * 260  # the rgb tokenizer's panel and the model's
    assert _has_colour(img[:, 260:], PLOT_COLOURS[1 + 1])  # depth's series (after loss and rgb in the legend)
