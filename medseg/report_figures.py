"""Pictures for report.html as PNG bytes: per-structure box plots and overlay montages.

Montages are composed as one RGB array (a tile per structure and view, contours traced on
the upsampled voxels) and labelled by matplotlib in a single figure, which keeps a
41-structure case to about a second instead of 120 separate axes.
"""

from __future__ import annotations

import functools
import io
import math
import re
import warnings
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from medseg.evaluate import CaseScores, LoadedPair
from medseg.fileio import readable
from medseg.metrics import structure_boxes
from medseg.report_scans import Underlay, grey_levels, viewing_window

REFERENCE_RGB = (31, 214, 85)  # green: reference contour (inside the reference)
PREDICTION_RGB = (255, 61, 240)  # magenta: prediction contour (just outside the prediction)
REFERENCE_HEX = "#1fd655"
PREDICTION_HEX = "#ff3df0"
BACKGROUND_RGB = (12, 12, 12)
# a tile's margin beyond the volume, on a scan: blue-grey, so that it is not taken for air
MARGIN_ON_SCAN_RGB = (34, 44, 64)
ISLAND_RGB = (150, 40, 140)  # dark magenta fill: stray predicted islands, projected
ISLAND_HEX = "#96288c"
TISSUE_RGB = (62, 62, 62)  # any labelled structure of the reference
STRUCTURE_RGB = (105, 105, 105)  # the structure shown, in the reference
# the montage's layout in displayed pixels; drawn at MONTAGE_DENSITY pixels per displayed one
TILE = 128  # pixels per view
GAP = 4
TITLE_H = 22
HEADER_H = 34
PER_ROW = 3  # structures per montage row
RING = 2  # width of the contours
MONTAGE_DENSITY = 2  # as BOX_DENSITY: sharp contours and text on HiDPI screens and zoomed in
BOX_METRICS = (("dice", "Dice"), ("nsd", "surface Dice (NSD)"), ("hd95_mm", "HD95 (mm)"),
               ("diff_pct", "volume difference (% of reference)"))
# panels whose values can be infinite: a band at the right edge, off the scale, holds the
# count of each structure's infinite values, so that no count hides a dot
COUNTED = ("hd95_mm", "diff_pct")
BAND = 0.2  # the band's share of such a panel's width
BOX_DPI = 80  # the box plots' layout: 1200 px wide at this density, as the page shows them
BOX_DENSITY = 2  # pixels per displayed pixel: crisp when presented, zoomed or on HiDPI
# kana, CJK ideographs and hangul: matplotlib's own fonts have none of them
CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
CJK_PROBE = 0x4E2D  # 中: a font holding it is taken for a CJK one


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_text(draw: Callable[..., bytes]) -> Callable[..., bytes]:
    """Draw with matplotlib's mathtext off: case and structure names are text, and a `$` in
    one ("pt_$1_$2") would otherwise be parsed as a formula and fail the report. Names in a
    CJK script (among the string arguments) fall back to an installed CJK font, if any.
    Glyphs the fonts lack are not warned of."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs) -> bytes:
        settings: dict = {"text.parse_math": False}
        if _holds_cjk(args) and (font := cjk_font()) is not None:
            settings["font.family"] = [*_pyplot().rcParams["font.family"], font]
        with _pyplot().rc_context(settings), warnings.catch_warnings():
            # a name in a script the font lacks (Chinese, say) is drawn as boxes; the
            # report's tables give it in full, and the console stays free of the warning
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from")
            return draw(*args, **kwargs)

    return wrapper


def _holds_cjk(values) -> bool:
    """Whether a string among `values`, or in their lists and tuples, has CJK characters."""
    return any(CJK.search(value) if isinstance(value, str) else
               isinstance(value, list | tuple) and _holds_cjk(value) for value in values)


@functools.cache
def cjk_font() -> str | None:
    """The family of an installed font with CJK glyphs (found by matplotlib), or None. Looked
    for only when a name needs one: it opens each font file."""
    from matplotlib import font_manager, ft2font

    for entry in font_manager.fontManager.ttflist:
        if entry.name.startswith("Last Resort"):  # matplotlib's: a box for every character
            continue
        try:
            if CJK_PROBE in ft2font.FT2Font(entry.fname).get_charmap():
                return entry.name
        except (OSError, RuntimeError, ValueError):  # a font FreeType cannot open
            continue
    return None


def _horizontal() -> dict:
    """boxplot's keyword for horizontal boxes: `orientation` from matplotlib 3.10 on."""
    import matplotlib

    major, minor = (int(p) for p in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def png_bytes(fig) -> bytes:
    """The figure as PNG (see `rgb_png`)."""
    return rgb_png(_rendered(fig))


def _rendered(fig) -> np.ndarray:
    """The figure's pixels, RGB (its background is opaque), and the figure closed."""
    fig.canvas.draw()
    pixels = np.array(fig.canvas.buffer_rgba())[..., :3]
    _pyplot().close(fig)
    return pixels


def rgb_png(pixels: np.ndarray) -> bytes:
    """RGB pixels as PNG, with no alpha channel (a tenth smaller than matplotlib's RGBA)
    and no text chunk (matplotlib's software tag is a URL; the report holds none)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@_plain_text
def boxplots_png(results: list[CaseScores], structures: list[str], tolerance_mm: float | None
                 ) -> bytes:
    """One panel per metric (BOX_METRICS), one horizontal box per structure; each case a dot.
    Infinite and undefined values are left out; each structure's infinite ones are counted
    at the right edge."""
    return png_bytes(boxplots_figure(results, structures, tolerance_mm))


def boxplots_figure(results: list[CaseScores], structures: list[str],
                    tolerance_mm: float | None):
    """The matplotlib figure of `boxplots_png`."""
    plt = _pyplot()

    height = 1.2 + 0.25 * len(structures)
    fig, axes = plt.subplots(1, len(BOX_METRICS), figsize=(15, height), sharey=True,
                             dpi=BOX_DPI * BOX_DENSITY)
    left = min(0.4, 0.025 + 0.0055 * max((len(s) for s in structures), default=8))
    fig.subplots_adjust(left=left, right=0.99, top=1 - 0.45 / height, bottom=0.45 / height,
                        wspace=0.12)
    rng = np.random.default_rng(0)  # jitter of the dots, fixed so the report is reproducible
    positions = np.arange(len(structures))[::-1]
    for ax, (metric, title) in zip(axes, BOX_METRICS, strict=True):
        values = [[box_value(r.scores[s], metric) for r in results] for s in structures]
        _draw_panel(ax, [[v for v in row if math.isfinite(v)] for row in values], positions,
                    rng)
        if metric == "nsd" and tolerance_mm is not None:
            title = f"surface Dice at {tolerance_mm:g} mm"
        ax.set_title(readable(title), fontsize=11)
        _x_axis(ax, metric)
        if metric in COUNTED:  # a miss is no dot: say how many, beside the scale
            _count_band(ax, [sum(1 for v in row if math.isinf(v)) for row in values],
                        positions)
    axes[0].set_yticks(positions, [readable(s) for s in structures], fontsize=9)
    axes[0].set_ylim(-0.7, len(structures) - 0.3)
    return fig


def box_value(scores: dict[str, float], metric: str) -> float:
    """The value a box plot shows: the score, or for `diff_pct` the volume difference in %
    of the reference volume (structures of 0.03 and 1500 ml share one axis): infinite where
    only the prediction holds the structure."""
    if metric != "diff_pct":
        return scores[metric]
    diff, ref = scores["diff_ml"], scores["ref_ml"]
    if math.isnan(diff) or math.isnan(ref) or (ref == 0 and diff == 0):
        return math.nan
    return 100.0 * diff / ref if ref > 0 else math.inf


def _draw_panel(ax, data: list[list[float]], positions: np.ndarray,
                rng: np.random.Generator) -> None:
    """A horizontal box per structure with finite values, each value a jittered dot."""
    filled = [i for i, d in enumerate(data) if d]
    if not filled:
        return
    ax.boxplot([data[i] for i in filled], positions=positions[filled], widths=0.6,
               showfliers=False, medianprops={"color": "#c0392b"}, **_horizontal())
    xs = np.concatenate([data[i] for i in filled])
    ys = np.concatenate([np.full(len(data[i]), positions[i], float) for i in filled])
    ax.plot(xs, ys + rng.uniform(-0.18, 0.18, ys.size), ".", color="#2c3e50",
            alpha=0.6, markersize=4)


def _x_axis(ax, metric: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.grid(axis="x", alpha=0.3)
    # at most six ticks: with long structure names the panels narrow, and the default
    # count ran labels such as 0.0025 into one another
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 5, 10]))
    if metric in ("dice", "nsd"):
        ax.set_xlim(-0.02, 1.02)
        ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1], ["0", "0.2", "0.4", "0.6", "0.8", "1"])
    if metric == "diff_pct":
        ax.axvline(0.0, color="#7f8c8d", linewidth=0.8)


def _count_band(ax, counts: list[int], positions: np.ndarray) -> None:
    """Widen the panel by a band right of its data, shaded, with each structure's count of
    infinite values in it (drawn over the data, the count hid the farthest dots)."""
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    edge = high + (high - low) * BAND / (1 - BAND)
    ax.set_xlim(low, edge)
    ax.set_xticks(ticks)  # no tick inside the band: it is off the scale
    ax.axvspan(high, edge, color="#f4f6f6", zorder=0)
    for position, misses in zip(positions, counts, strict=True):
        if misses:
            ax.text(edge - (edge - high) * 0.05, position, f"{misses} inf", ha="right",
                    va="center", fontsize=8, color="#c0392b")


def montage_png(pair: LoadedPair, labels: dict[int, str], scores: dict[str, dict[str, float]],
                title: str, underlay: Underlay | None = None) -> bytes:
    """Axial, coronal and sagittal slices through every structure present in the case, zoomed
    on it, with the reference contour (green) and the prediction contour (magenta); drawn on
    the case's scan (`underlay`, on the reference grid), or without it on flat greys."""
    pred, ref, spacing = _to_ras(pair)
    scan = None
    if underlay is not None:
        scan = underlay._replace(data=_as_ras(underlay.data, pair.affine))
    ids = [k for k in sorted(labels) if k > 0]
    pred_boxes, ref_boxes = structure_boxes(pred, ids), structure_boxes(ref, ids)
    present = [k for k in ids if pred_boxes[k] is not None or ref_boxes[k] is not None]
    tissue = ref > 0
    tiles = [(labels[k], _structure_tiles(pred, ref, tissue, k, spacing,
                                          _union(pred_boxes[k], ref_boxes[k]), scan))
             for k in present]
    canvas = _compose([t for _, t in tiles])
    return _label_montage(canvas, [(name, scores.get(name, {}).get("dice", math.nan))
                                   for name, _ in tiles], title)


def _to_ras(pair: LoadedPair) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both label maps turned to the closest RAS+ voxel order, with the matching spacing."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(pair.affine)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = pair.spacing
    return _as_ras(pair.prediction, pair.affine), _as_ras(pair.reference, pair.affine), spacing


def _as_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A volume of the grid `affine` in the closest RAS+ voxel order (a view, not a copy)."""
    import nibabel as nib

    return nib.orientations.apply_orientation(data, nib.orientations.io_orientation(affine))


def _union(a, b) -> tuple[slice, ...]:
    boxes = [box for box in (a, b) if box is not None]
    return tuple(slice(min(bx[i].start for bx in boxes), max(bx[i].stop for bx in boxes))
                 for i in range(3))


def _structure_tiles(pred: np.ndarray, ref: np.ndarray, tissue: np.ndarray, label: int,
                     spacing: np.ndarray, box: tuple[slice, ...],
                     scan: Underlay | None = None) -> list[np.ndarray]:
    """Three RGB tiles (axial, coronal, sagittal) through the reference structure's largest
    slices; on the scan (RAS voxel order, as the label maps) windowed within the crop."""
    crop = _grow(box, spacing, ref.shape)
    p, r, t = pred[crop] == label, ref[crop] == label, tissue[crop]
    grey = None
    if scan is not None:
        grey = grey_levels(scan.data[crop], viewing_window(scan.data[crop], scan.hounsfield))
    islands = stray_islands(p, r)
    tiles = []
    for axis in (2, 1, 0):  # axial (S), coronal (A), sagittal (R)
        other = tuple(i for i in range(3) if i != axis)
        index = largest_slice(p, r, axis)
        cut = [slice(None)] * 3
        cut[axis] = index
        pixel_spacing = (spacing[other[1]], spacing[other[0]])  # rows, columns
        tiles.append(_tile(*(_display(m[tuple(cut)]) for m in (p, r, t)), pixel_spacing,
                           _display(islands.any(axis=axis)),
                           None if grey is None else _display(grey[tuple(cut)])))
    return tiles


def stray_islands(prediction: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Parts of the prediction (26-connected) that do not touch the reference: a stray
    island far off the structure's largest slices was in no view, while its HD and ASSD
    showed it, so the overlay looked perfect. Where the reference lacks the structure, every
    part is one: the views go through the largest, and a second false positive showed in
    none of them."""
    parts, count = ndimage.label(prediction, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return np.zeros_like(prediction)
    touching = np.unique(parts[ndimage.binary_dilation(reference) & (parts > 0)])
    return (parts > 0) & ~np.isin(parts, touching)


def largest_slice(prediction: np.ndarray, reference: np.ndarray, axis: int) -> int:
    """The slice along `axis` where the reference covers most (the prediction, where the
    reference is empty): by the two masks together, a large false positive took all three
    views away from the structure, and no view showed the reference at all. Of equally large
    ones, the one where both show most (the first of them could hold one mask's outline
    only)."""
    other = tuple(i for i in range(3) if i != axis)
    areas = (reference if reference.any() else prediction).sum(axis=other)
    largest = np.flatnonzero(areas == areas.max())
    return int(largest[np.argmax((prediction & reference).sum(axis=other)[largest])])


def _grow(box: tuple[slice, ...], spacing: np.ndarray, shape: tuple[int, ...]
          ) -> tuple[slice, ...]:
    """The box grown by a quarter of its extent, at least 10 mm, within the volume."""
    grown = []
    for axis, s in enumerate(box):
        extent_mm = (s.stop - s.start) * spacing[axis]
        margin = int(math.ceil(max(10.0, 0.25 * extent_mm) / spacing[axis]))
        grown.append(slice(max(s.start - margin, 0), min(s.stop + margin, shape[axis])))
    return tuple(grown)


def _display(plane: np.ndarray) -> np.ndarray:
    """(horizontal, vertical) RAS plane -> rows top-down, columns left-right: superior and
    anterior up; patient's right on the left (radiological); sagittal anterior on the left."""
    return plane.T[::-1, ::-1]


def _tile(pred: np.ndarray, ref: np.ndarray, tissue: np.ndarray,
          pixel_spacing: tuple[float, float], islands: np.ndarray | None = None,
          scan: np.ndarray | None = None) -> np.ndarray:
    """A square RGB picture of one plane (TILE displayed pixels a side, MONTAGE_DENSITY
    times as many drawn) at equal mm per pixel in both directions, on the scan's grey levels
    (`scan`, uint8) or else on flat greys for the reference's structures; `islands` (the
    projection of the prediction's stray islands) drawn filled, in the prediction's
    colour."""
    side = TILE * MONTAGE_DENSITY
    extent = (pred.shape[0] * pixel_spacing[0], pred.shape[1] * pixel_spacing[1])
    scale = side / max(extent)  # pixels per mm
    size = [max(1, min(side, int(round(e * scale)))) for e in extent]
    rows = np.minimum((np.arange(size[0]) / (scale * pixel_spacing[0])).astype(int),
                      pred.shape[0] - 1)
    cols = np.minimum((np.arange(size[1]) / (scale * pixel_spacing[1])).astype(int),
                      pred.shape[1] - 1)
    pick = np.ix_(rows, cols)
    p, r = pred[pick], ref[pick]
    if scan is None:
        image = np.empty((*p.shape, 3), np.uint8)
        image[:] = BACKGROUND_RGB
        image[tissue[pick]] = TISSUE_RGB
        image[r] = STRUCTURE_RGB
    else:
        image = np.repeat(scan[pick][..., None], 3, axis=-1)
    if islands is not None:
        image[islands[pick]] = ISLAND_RGB
    ring = RING * MONTAGE_DENSITY
    image[r & ~ndimage.binary_erosion(r, iterations=ring)] = REFERENCE_RGB
    image[ndimage.binary_dilation(p, iterations=ring) & ~p] = PREDICTION_RGB
    tile = np.empty((side, side, 3), np.uint8)
    tile[:] = BACKGROUND_RGB if scan is None else MARGIN_ON_SCAN_RGB
    top, left = (side - size[0]) // 2, (side - size[1]) // 2
    tile[top:top + size[0], left:left + size[1]] = image
    return tile


def _compose(structures: list[list[np.ndarray]]) -> np.ndarray:
    """Tiles on a white canvas: PER_ROW structures a row, each as three views side by side."""
    n_rows = max(1, math.ceil(len(structures) / PER_ROW))
    block_w = 3 * TILE + 2 * GAP
    width = PER_ROW * block_w + (PER_ROW - 1) * 4 * GAP
    height = HEADER_H + n_rows * (TITLE_H + TILE + 2 * GAP)
    d = MONTAGE_DENSITY
    canvas = np.full((height * d, width * d, 3), 255, np.uint8)
    for i, views in enumerate(structures):
        top, left = _block_origin(i)
        for j, tile in enumerate(views):
            y, x = (top + TITLE_H) * d, (left + j * (TILE + GAP)) * d
            canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return canvas


def _block_origin(i: int) -> tuple[int, int]:
    """The top left of structure `i`'s block, in displayed pixels."""
    row, col = divmod(i, PER_ROW)
    return (HEADER_H + row * (TITLE_H + TILE + 2 * GAP),
            col * (3 * TILE + 2 * GAP + 4 * GAP))


@_plain_text
def _label_montage(canvas: np.ndarray, names: list[tuple[str, float]], title: str) -> bytes:
    """The canvas with its text: drawn by matplotlib on a white figure of the canvas's size
    and density, and the darker of the two pixels kept (text and tiles never meet;
    matplotlib's compositing of the canvas itself, at twice the density, took seconds)."""
    plt = _pyplot()
    dpi = 100 * MONTAGE_DENSITY
    fig = plt.figure(figsize=(canvas.shape[1] / dpi, canvas.shape[0] / dpi), dpi=dpi)
    height, width = (n / MONTAGE_DENSITY for n in canvas.shape[:2])  # displayed pixels

    renderer = fig.canvas.get_renderer()

    def text(x: float, y: float, words: str, room: float | None = None, **style) -> None:
        """Text at displayed pixels (y downwards); with `room`, shortened to fit that
        width."""
        label = fig.text(x / width, 1.0 - y / height, readable(words), va="center", **style)
        if room is not None:
            fit_text(label, renderer, room * MONTAGE_DENSITY)

    legend_x = width - 420
    # a long case name (BIDS: sub-001_ses-baseline_acq-..._dseg) ran into the legend
    text(4, HEADER_H / 2, title, room=legend_x - 16, fontsize=11, fontweight="bold")
    text(legend_x, HEADER_H / 2, "\u2014 reference", color=REFERENCE_HEX, fontsize=10,
         fontweight="bold")
    text(legend_x + 105, HEADER_H / 2, "\u2014 prediction", color=PREDICTION_HEX, fontsize=10,
         fontweight="bold")
    text(legend_x + 215, HEADER_H / 2, "views: axial \u00b7 coronal \u00b7 sagittal",
         fontsize=9, color="#555555")
    for i, (name, dice) in enumerate(names):
        top, left = _block_origin(i)
        label = name if not math.isfinite(dice) else f"{name}   Dice {dice:.3f}"
        text(left + 1, top + TITLE_H / 2 + 2, label, room=3 * TILE + 2 * GAP, fontsize=9)
    if not names:
        text(4, HEADER_H + 40, "no structure in the reference or the prediction", fontsize=10)
    return rgb_png(np.minimum(canvas, _white_padded(_rendered(fig), canvas.shape)))


def _white_padded(pixels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`pixels` cut or padded with white to `shape` (a figure's size in inches times its dpi
    may round down a pixel)."""
    padded = np.full(shape, 255, np.uint8)
    rows, cols = min(shape[0], pixels.shape[0]), min(shape[1], pixels.shape[1])
    padded[:rows, :cols] = pixels[:rows, :cols]
    return padded


def fit_text(label, renderer, room: float) -> None:
    """Shorten a matplotlib text to at most `room` pixels wide: its middle is replaced by an
    ellipsis (the start and the end, such as "(mean Dice 0.854)", are kept; the report's
    heading above the picture and its tables give the name in full)."""
    words = label.get_text()
    cut = 0
    while label.get_window_extent(renderer).width > room and cut < len(words) - 8:
        cut += max(1, (len(words) - cut) // 12)
        middle = (len(words) - cut) // 2
        label.set_text(words[:middle] + "\u2026" + words[middle + cut:])
