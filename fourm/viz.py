"""Pictures of modalities for reports, demos and generated outputs: depth colour maps, semseg
palettes and overlays, boxes drawn on images, captions under images, grids."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# a perceptually ordered ramp (dark purple -> yellow), interpolated to 256 entries
_RAMP = np.array(
    [[13, 8, 135], [84, 2, 163], [139, 10, 165], [185, 50, 137], [219, 92, 104], [244, 136, 73], [254, 188, 43], [240, 249, 33]],
    float,
)
DEPTH_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_RAMP)), _RAMP[:, c]) for c in range(3)], 1).astype(np.uint8)


def colorize_depth(depth: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8; near is bright, on a log scale between vmin and vmax
    (default: the 2nd and 98th percentiles)."""
    d = np.log(np.clip(np.asarray(depth, np.float64), 1e-3, None))
    lo = np.log(vmin) if vmin else np.percentile(d, 2)
    hi = np.log(vmax) if vmax else np.percentile(d, 98)
    x = 1.0 - np.clip((d - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return DEPTH_LUT[(x * 255).astype(np.uint8)]


def palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour palette: (n, 3) uint8, class 0 black."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


_PALETTE = palette()


def colorize_semseg(semseg: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 palette colours."""
    return _PALETTE[np.asarray(semseg).astype(np.int64) % 256]


def overlay(rgb: np.ndarray, semseg: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the semseg palette over an (H, W, 3) uint8 image."""
    return (rgb.astype(np.float32) * (1 - alpha) + colorize_semseg(semseg).astype(np.float32) * alpha).astype(np.uint8)


def draw_boxes(rgb: np.ndarray, boxes: list[dict], scale: int = 1) -> np.ndarray:
    """Draw ``[{"bbox": [x0, y0, x1, y1], "label": str}]`` on an (H, W, 3) uint8 image, upscaled by ``scale``."""
    im = Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    for i, b in enumerate(boxes):
        color = tuple(int(v) for v in _PALETTE[(i % 20) + 1])
        x0, y0, x1, y1 = (v * scale for v in b["bbox"])
        x0, x1 = sorted((x0, x1))  # generated boxes may come with corners swapped
        y0, y1 = sorted((y0, y1))
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=max(1, scale // 2))
        words = b["label"].split()  # a generated label may be empty or blank
        if scale >= 2 and words:
            draw.text((x0 + 1, y0 + 1), words[-1], fill=color)
    return np.asarray(im)


def caption_strip(text: str, width: int, lines: int = 8) -> np.ndarray:
    """Text wrapped into a white (h, width, 3) uint8 strip."""
    font = ImageFont.load_default()
    wrapped = textwrap.wrap(text, width=max(8, width // 6))[:lines]
    im = Image.new("RGB", (width, 12 * lines + 4), "white")
    ImageDraw.Draw(im).multiline_text((2, 2), "\n".join(wrapped), fill="black", font=font, spacing=2)
    return np.asarray(im)


def upscale(img: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an (H, W, 3) uint8 image."""
    return np.asarray(Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST))


def grid(rows: list[list[np.ndarray]], pad: int = 2, headers: list[str] | None = None) -> np.ndarray:
    """Tile (h, w, 3) uint8 panels into a white-padded grid; each column is as wide as its widest
    panel, each row as tall as its tallest; panels are top-left aligned in their cell. ``headers``:
    a title above each column (a first row of ``title_strip`` bands)."""
    ncols = max(len(r) for r in rows)
    widths = [max((r[j].shape[1] for r in rows if j < len(r)), default=0) for j in range(ncols)]
    if headers:
        rows = [[title_strip(headers[j] if j < len(headers) else "", widths[j]) for j in range(ncols)], *rows]
    heights = [max(p.shape[0] for p in r) for r in rows]
    out = np.full((sum(heights) + pad * (len(rows) + 1), sum(widths) + pad * (ncols + 1), 3), 255, np.uint8)
    y = pad
    for r, h in zip(rows, heights):
        x = pad
        for p, w in zip(r, widths):
            out[y : y + p.shape[0], x : x + p.shape[1]] = p
            x += w + pad
        y += h + pad
    return out


PASS_COLOR, FAIL_COLOR = (30, 160, 60), (200, 30, 30)


def labelled_cell(img: np.ndarray, lines: list[str], ok: bool | None = None, scale: int = 2, border: int = 3, max_lines: int = 14) -> np.ndarray:
    """An (H, W, 3) uint8 image upscaled by ``scale`` in a frame, green when ``ok``, red when not
    (grey for None), above ``lines`` of text wrapped to its width: one cell of a pass/fail grid."""
    color = {True: PASS_COLOR, False: FAIL_COLOR, None: (160, 160, 160)}[ok]
    big = np.pad(upscale(img, scale), ((border, border), (border, border), (0, 0)))
    big[:border], big[-border:], big[:, :border], big[:, -border:] = color, color, color, color
    font = ImageFont.load_default()
    chars = max(8, big.shape[1] // 6)
    wrapped = ([{True: "PASS", False: "FAIL", None: ""}[ok]] + [w for line in lines for w in textwrap.wrap(line, width=chars)])[:max_lines]
    strip = Image.new("RGB", (big.shape[1], 12 * len(wrapped) + 4), "white")
    draw = ImageDraw.Draw(strip)
    draw.text((2, 2), wrapped[0], fill=color, font=font)
    draw.multiline_text((2, 14), "\n".join(wrapped[1:]), fill="black", font=font, spacing=2)
    return np.concatenate([big, np.asarray(strip)], 0)


def title_strip(text: str, width: int, height: int = 16) -> np.ndarray:
    """One line of text on a light grey (height, width, 3) uint8 band: a row's heading in a grid."""
    im = Image.new("RGB", (max(width, 8), height), (235, 235, 235))
    ImageDraw.Draw(im).text((3, 2), text, fill="black", font=ImageFont.load_default())
    return np.asarray(im)


def legend_strip(entries: list[tuple[str, tuple[int, int, int]]], width: int, height: int = 18) -> np.ndarray:
    """A white (h, width, 3) uint8 band of colour swatches, each followed by its name, wrapped onto
    as many lines as the width needs: the key to a picture's colours (e.g. semseg classes)."""
    font = ImageFont.load_default()
    cells = [16 + int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(name, font=font)) + 14 for name, _ in entries]
    lines, x = 1, 4
    for w in cells:
        if x + w > width and x > 4:
            lines, x = lines + 1, 4
        x += w
    im = Image.new("RGB", (width, height * lines), "white")
    draw = ImageDraw.Draw(im)
    x, y = 4, 0
    for (name, colour), w in zip(entries, cells):
        if x + w > width and x > 4:
            x, y = 4, y + height
        draw.rectangle([x, y + 4, x + 11, y + 14], fill=tuple(int(c) for c in colour), outline=(120, 120, 120))
        draw.text((x + 16, y + 3), name, fill="black", font=font)
        x += w
    return np.asarray(im)


def semseg_legend(classes: list[str] | tuple[str, ...], width: int, overlay_on: tuple[int, int, int] | None = None) -> np.ndarray:
    """``legend_strip`` of semseg classes in ``colorize_semseg``'s colours (blended half-way over
    ``overlay_on``, as ``overlay`` draws them on an image, when given)."""
    colours = [_PALETTE[i].astype(np.float32) for i in range(len(classes))]
    if overlay_on is not None:
        colours = [(c + np.asarray(overlay_on, np.float32)) / 2 for c in colours]
    return legend_strip([(name, tuple(c.astype(np.uint8))) for name, c in zip(classes, colours)], width)


PLOT_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207), (140, 86, 75), (227, 119, 194)]


def line_chart(panels: list[dict], legend: list[str], panel: tuple[int, int] = (260, 200)) -> np.ndarray:
    """Curves as an (H, W, 3) uint8 picture: panels side by side, a legend below.

    Each panel is ``{"title": str, "series": [(legend index, [(x, y), ...]), ...], "x_max": float,
    "x_unit": str, "log_y": bool (optional)}``; a series is drawn in ``PLOT_COLOURS[legend index]``,
    points where y is None or not finite are left out; the y range is the data's, labelled."""
    w, h = panel
    margin, legend_h = 36, 18 * ((len(legend) + 2) // 3) + 8
    img = Image.new("RGB", (w * max(1, len(panels)), h + legend_h), "white")
    draw = ImageDraw.Draw(img)
    for i, pan in enumerate(panels):
        x0, x_max, log_y = i * w, max(float(pan["x_max"]), 1e-9), bool(pan.get("log_y"))
        tf = (lambda v: float(np.log10(v))) if log_y else float  # noqa: E731
        ok = lambda v: v is not None and np.isfinite(v) and (v > 0 or not log_y)  # noqa: E731
        values = [tf(v) for _, pts in pan["series"] for _, v in pts if ok(v)]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 0.1 else (lo, hi)
        px = lambda m: x0 + margin + (w - margin - 10) * m / x_max  # noqa: E731
        py = lambda v: 20 + (h - 20 - margin) * (1 - (tf(v) - lo) / (hi - lo))  # noqa: E731
        draw.rectangle([px(0), 20, px(x_max), h - margin], outline=(160, 160, 160))
        draw.text((x0 + margin, 4), pan["title"], fill="black")
        for v in (lo, hi):
            shown = 10 ** v if log_y else v
            draw.text((x0 + 2, 20 + (h - 20 - margin) * (1 - (v - lo) / (hi - lo)) - 6), f"{shown:.2f}" if shown < 100 else f"{shown:.0f}", fill=(90, 90, 90))
        draw.text((px(0), h - margin + 4), "0", fill=(90, 90, 90))
        draw.text((px(x_max) - 6 * len(f"{x_max:g} {pan['x_unit']}"), h - margin + 4), f"{x_max:g} {pan['x_unit']}", fill=(90, 90, 90))
        for j, pts in pan["series"]:
            xy = [(px(m), py(v)) for m, v in pts if ok(v)]
            colour = PLOT_COLOURS[j % len(PLOT_COLOURS)]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            if len(xy) <= 12:
                for x, y in xy:
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    for j, name in enumerate(legend):
        x, y = 8 + (j % 3) * (img.width // 3), h + 4 + 18 * (j // 3)
        draw.rectangle([x, y + 3, x + 12, y + 11], fill=PLOT_COLOURS[j % len(PLOT_COLOURS)])
        draw.text((x + 18, y), name, fill="black")
    return np.asarray(img)
