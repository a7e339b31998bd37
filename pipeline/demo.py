"""Offline demo data: a seeded generator of a zip laid out exactly like Kaggle's competition zip.

`fetch` calls `write_demo_zip` when `fetch.source` is `demo`. The zip holds `train.zip`
(`train/cat.N.jpg`, `train/dog.N.jpg`), `test.zip` (`test/N.jpg`) and `sample_submission.csv`
(`id,label`), so every later stage runs the same code on the demo and on the real data.

The "animals" are synthetic: a centred body with a head and ears on a cluttered background. What
tells them apart is what a frozen, randomly initialised VGG16 keeps (see shared/notes/demo-data.md):
cats wear fine stripes, dogs big spots, and each class leans to its own palette with overlap. Sizes,
aspect ratios, positions, colours, backgrounds, noise and JPEG quality vary per image; a fraction is
hard (small, faint or half hidden subject) and a fraction is mislabelled, so accuracy stays below 100%
and probability clipping matters. Run alone: `python -m pipeline.demo out.zip labels.csv` (uses
params.yaml's fetch.demo).
"""

from __future__ import annotations

import argparse
import colorsys
import io
import zipfile

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import load_params
from pipeline.params.fetch import DemoParams, FetchParams

ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: same seed, byte-identical zip
CLASS_HUE = {"cat": 0.08, "dog": 0.58}  # palettes lean orange (cats) vs blue-grey (dogs), and overlap


def draw_animal(rng: np.random.Generator, kind: str, width: int, height: int, hard: bool) -> Image.Image:
    """One synthetic photo of a `kind` ("cat" or "dog") as an RGB image of width x height."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    side = min(width, height)

    # background: a gradient between two random colours, plus low-contrast clutter
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (xx * np.cos(angle) + yy * np.sin(angle)) / max(width, height)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]  # (H, W, 3)
    for _ in range(rng.integers(2, 7)):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * side
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        img[blob] = img[blob] * 0.7 + rng.uniform(0, 255, 3) * 0.3

    # body: a rotated ellipse near the centre, its size relative to the short side
    scale = rng.uniform(0.18, 0.26) if hard else rng.uniform(0.30, 0.42)
    a = scale * side
    b = a * rng.uniform(0.65, 0.95)
    cx = width / 2 + rng.uniform(-0.08, 0.08) * side
    cy = height / 2 + rng.uniform(-0.05, 0.12) * side
    rot = rng.uniform(-0.5, 0.5)
    u = ((xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)) / a  # body coordinates, half-axis = 1
    v = (-(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)) / b
    body = u**2 + v**2 < 1

    hue = (CLASS_HUE[kind] + rng.normal(0, 0.12)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.3, 0.9), rng.uniform(0.55, 1.0))) * 255
    contrast = rng.uniform(0.15, 0.35) if hard else rng.uniform(0.45, 0.85)
    mark = base * (1 - contrast)
    if kind == "cat":  # fine stripes: period 0.15-0.22 of the half-axis
        phi, period = rng.uniform(0, np.pi), rng.uniform(0.15, 0.22)
        pattern = np.sin(2 * np.pi * (u * np.cos(phi) + v * np.sin(phi)) / period) > 0
    else:  # big spots: radius 0.25-0.35 of the half-axis on a jittered grid
        radius = rng.uniform(0.25, 0.35)
        pattern = np.zeros_like(body)
        for gu in np.arange(-1.2, 1.3, 2.4 * radius):
            for gv in np.arange(-1.2, 1.3, 2.4 * radius):
                su, sv = gu + rng.uniform(-0.3, 0.3) * radius, gv + rng.uniform(-0.3, 0.3) * radius
                pattern |= (u - su) ** 2 + (v - sv) ** 2 < (radius * rng.uniform(0.8, 1.2)) ** 2
    img[body] = np.where(pattern[body][:, None], mark, base)

    # head and ears (a shape cue for people; the texture carries the class for the model)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    hx, hy, hr = cx + a * np.cos(rot) * 0.95, cy + a * np.sin(rot) * 0.95 - b * 0.4, b * 0.55
    head = tuple(int(c) for c in base)
    if kind == "cat":  # pointed ears
        for s in (-1, 1):
            draw.polygon(
                [
                    (hx + s * hr * 0.9, hy - hr * 0.2),
                    (hx + s * hr * 0.2, hy - hr * 0.6),
                    (hx + s * hr * 0.75, hy - hr * 1.5),
                ],
                fill=head,
            )
    else:  # floppy ears
        for s in (-1, 1):
            draw.ellipse(
                [hx + s * hr * 0.6 - hr * 0.35, hy - hr * 0.5, hx + s * hr * 0.6 + hr * 0.35, hy + hr * 0.9],
                fill=tuple(int(c) for c in mark),
            )
    draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=head)
    if hard and rng.random() < 0.5:  # something in front of the animal
        x0 = rng.uniform(0, width * 0.6)
        draw.rectangle([x0, 0, x0 + width * 0.35, height], fill=tuple(int(c) for c in c1))

    # sensor noise
    out = np.asarray(pil, dtype=np.float32) + rng.normal(0, rng.uniform(2, 12), (height, width, 3))
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_image(rng: np.random.Generator, label: str, params: DemoParams) -> tuple[bytes, str]:
    """A JPEG named `label`; returns (bytes, the class actually drawn), which differ when mislabelled."""
    drawn = label
    if rng.random() < params.mislabel_fraction:
        drawn = "dog" if label == "cat" else "cat"
    width, height = (int(s) for s in rng.integers(params.min_side, params.max_side + 1, 2))
    img = draw_animal(rng, drawn, width, height, hard=rng.random() < params.hard_fraction)
    return encode_jpeg(img, int(rng.integers(60, 96))), drawn


def _zip_bytes(members: dict[str, bytes], compression: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=ZIP_DATE), data, compress_type=compression)
    return buf.getvalue()


def build_demo(params: DemoParams) -> tuple[dict[str, bytes], list[tuple[int, int]]]:
    """The competition zip's members, and the hidden test labels as (id, 1 if dog else 0)."""
    rng = np.random.default_rng(params.seed)
    train = {}
    for label in ("cat", "dog"):
        for i in range(params.train_per_class):
            train[f"train/{label}.{i}.jpg"] = make_image(rng, label, params)[0]
    test, labels = {}, []
    for i in range(1, params.test_count + 1):
        label = "dog" if rng.random() < 0.5 else "cat"
        test[f"test/{i}.jpg"] = make_image(rng, label, params)[0]
        labels.append((i, int(label == "dog")))
    sample = "id,label\n" + "".join(f"{i},0.5\n" for i in range(1, params.test_count + 1))
    members = {
        "sample_submission.csv": sample.encode(),
        "test.zip": _zip_bytes(test, zipfile.ZIP_STORED),  # JPEGs do not compress further
        "train.zip": _zip_bytes(train, zipfile.ZIP_STORED),
    }
    return members, labels


def write_demo_zip(zip_path, labels_path, params: DemoParams) -> None:
    """Write the competition zip and the hidden test labels (`id,label`, label 1 = dog)."""
    members, labels = build_demo(params)
    with zipfile.ZipFile(zip_path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=ZIP_DATE), data, compress_type=zipfile.ZIP_DEFLATED)
    with open(labels_path, "w") as f:
        f.write("id,label\n" + "".join(f"{i},{y}\n" for i, y in labels))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zip_path")
    parser.add_argument("labels_path")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    write_demo_zip(args.zip_path, args.labels_path, load_params(FetchParams, "fetch", args.params).demo)


if __name__ == "__main__":
    main()
