"""A PNG bar chart of a benchmark, drawn with Pillow (no plotting library needed): one horizontal bar per pipeline,
split into its stages (median milliseconds), the end-to-end time at its end."""

from __future__ import annotations

from pathlib import Path

from diffship.benchmarking.report import denoiser_label
from diffship.checks import software_exif

# stage -> (legend label, colour)
SEGMENTS = {
    "text_encoder": ("text encoder", (86, 180, 233)),
    "unet": ("UNet", (0, 114, 178)),  # or "Transformer": report.denoiser_label
    "scheduler_and_glue": ("scheduler and glue", (230, 159, 0)),
    "vae_encode": ("VAE encode", (204, 121, 167)),
    "vae_decode": ("VAE decode", (0, 158, 115)),
}


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> float:
    return draw.textlength(text, font=font)


def plot_report(report: dict, path: str | Path, title: str | None = None) -> Path:
    from PIL import Image, ImageDraw

    results = [r for r in report["results"] if r.get("stages")]
    if not results:
        raise ValueError("no pipeline has figures to plot (every one failed)")
    stages = [s for s in SEGMENTS if any((r["stages"].get(s) or {}).get("median") for r in results)]
    title = title or f"{report['settings']['height']}x{report['settings']['width']}, " \
                     f"{report['settings']['steps']} steps: median latency per stage"
    font, small, bold = _font(15), _font(13), _font(18)

    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(_text_width(scratch, r["name"], font) for r in results)) + 36
    bar_w, bar_h, gap, top = 760, 30, 14, 70
    legend_h = 40
    width = label_w + bar_w + 150
    height = top + len(results) * (bar_h + gap) + 50 + legend_h
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((16, 16), title, fill="black", font=bold)
    machine = report.get("machine", {})
    draw.text((16, 42), f"{machine.get('cpu', '')}, {machine.get('cores', '?')} cores  ·  {report.get('date', '')}",
              fill=(90, 90, 90), font=small)

    longest = max(r["stages"]["total"]["median"] for r in results)
    scale = bar_w / longest
    for i, r in enumerate(results):
        y = top + i * (bar_h + gap)
        draw.text((16, y + bar_h / 2), r["name"], fill="black", font=font, anchor="lm")
        x = label_w
        for stage in stages:
            figures = r["stages"].get(stage)
            if not figures:
                continue
            w = figures["median"] * scale
            draw.rectangle([x, y, x + max(w, 1), y + bar_h], fill=SEGMENTS[stage][1])
            x += w
        total = r["stages"]["total"]["median"]
        # The stages' medians need not sum to the median total exactly; the bar ends at the total.
        x = max(x, label_w + total * scale)
        draw.text((x + 8, y + bar_h / 2), f"{total:.2f} s", fill="black", font=font, anchor="lm")

    # axis: seconds
    axis_y = top + len(results) * (bar_h + gap) + 4
    draw.line([label_w, axis_y, label_w + bar_w, axis_y], fill="black")
    step = _tick_step(longest)
    t = 0.0
    while t <= longest + 1e-9:
        x = label_w + t * scale
        draw.line([x, axis_y, x, axis_y + 5], fill="black")
        draw.text((x, axis_y + 8), f"{t:g} s", fill="black", font=small, anchor="mt")
        t += step

    x = label_w
    legend_y = axis_y + 36
    for stage in stages:
        label, colour = SEGMENTS[stage]
        label = denoiser_label(report) if stage == "unet" else label
        draw.rectangle([x, legend_y, x + 14, legend_y + 14], fill=colour)
        draw.text((x + 20, legend_y + 7), label, fill="black", font=small, anchor="lm")
        x += 40 + _text_width(draw, label, small)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=software_exif())  # marked as diffship's: a later run may replace it
    return path


def _tick_step(longest: float) -> float:
    """A round tick spacing giving 4 to 10 ticks."""
    for step in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500):
        if longest / step <= 10:
            return step
    return longest / 5
