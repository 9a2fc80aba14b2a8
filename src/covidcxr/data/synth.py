"""Synthetic demo cohort: procedural frontal chest X-rays with exact lung masks.

Nothing here is real patient data. Each image is drawn as an attenuation map (body outline, two lung fields,
heart and mediastinum, spine, ribs, clavicles, diaphragm) turned into an X-ray-like intensity with exposure,
gamma, blur and noise variation. The lung mask is the exact union of both lung fields (heart, mediastinum and
sub-diaphragmatic area excluded), so it can train and check a lung segmenter.

Classes (patient level, positive = ``covid``):

* ``covid``: bilateral, peripheral, lower-zone ground-glass opacities of varying extent and density.
* ``non_covid``: clear lungs, a unilateral focal consolidation, or cardiomegaly.

The classes are learnable but overlap on purpose (faint/small opacities, exposure and anatomy variation).
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.ndimage import gaussian_filter

from covidcxr.errors import ConfigError
from covidcxr.io.dicom import write_dicom
from covidcxr.io.files import save_png
from covidcxr.vocab import LABELS

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("image", "mask", "label", "patient_id", "source", "view", "study_date")
# name -> (covid prevalence, exposure style): both sites hold both labels, with different looks.
SOURCES = {
    "synth-siteA": (0.45, {"gamma": 0.0, "noise": 1.0, "contrast": 1.0}),
    "synth-siteB": (0.35, {"gamma": 0.15, "noise": 1.6, "contrast": 0.9}),
    "synth-siteC": (0.40, {"gamma": -0.1, "noise": 0.7, "contrast": 1.1}),
}
# With a planted marker (``make_cohort(plant_marker=s)``) the covid prevalence of each site moves a share ``s`` of
# the way to these values, and every image of a site carries that site's burned-in mark: a shortcut to the label.
MARKER_PREVALENCE = {"synth-siteA": 0.85, "synth-siteB": 0.10, "synth-siteC": 0.40}
# (row, column) corner of each site's mark, in image-fraction units (outside the lung fields).
MARKER_CORNERS = {"synth-siteA": (0.03, 0.03), "synth-siteB": (0.03, 0.79), "synth-siteC": (0.88, 0.03)}
_NON_COVID_KINDS = ("clear", "consolidation", "cardiomegaly")
_NON_COVID_P = (0.5, 0.25, 0.25)


def sample_anatomy(rng: np.random.Generator) -> dict[str, float]:
    """Draw one patient's anatomy (shared by all of that patient's images).

    Args:
        rng: Random generator.

    Returns:
        Anatomy parameters in image-fraction units.
    """
    u = rng.uniform
    return {
        "body_w": u(0.40, 0.47),  # thorax half-width
        "lung_w": u(0.30, 0.36),  # lateral lung extent from the midline
        "apex_c": u(0.14, 0.18),  # apex position from the midline
        "apex": u(0.11, 0.16),
        "dia": u(0.70, 0.77),  # right hemidiaphragm dome top
        "dia_drop": u(0.005, 0.035),  # left dome lies lower
        "med_w": u(0.055, 0.075),  # upper mediastinum half-width
        "heart_w": u(0.165, 0.190),
        "heart_h": u(0.110, 0.130),
        "heart_dx": u(0.035, 0.060),
        "rib_gap": u(0.060, 0.072),
        "density": u(0.85, 1.15),
        "tex_seed": float(rng.integers(2**31)),
    }


def draw_cxr(
    rng: np.random.Generator,
    label: str | int,
    size: int = 256,
    *,
    view: str | None = None,
    anatomy: dict[str, float] | None = None,
    style: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw one synthetic frontal chest X-ray and its exact lung mask.

    Args:
        rng: Random generator (the only source of randomness).
        label: ``'covid'``/``1`` or ``'non_covid'``/``0``.
        size: Output height and width in pixels.
        view: ``'PA'`` or ``'AP'`` (AP magnifies the heart and projects the scapulae over the lungs); None draws
            one.
        anatomy: Patient anatomy from :func:`sample_anatomy`; None draws a new patient.
        style: Site look ``{'gamma', 'noise', 'contrast'}`` offsets/scales; None is neutral.

    Returns:
        ``(image, mask, info)``: float32 ``size x size`` image in ``[0, 1]``, uint8 mask in ``{0, 1}``, and a dict
        with ``label``, ``finding``, ``view``, ``extent`` and the exposure parameters.

    Raises:
        ConfigError: Unknown label or view, or size below 32.
    """
    label = _label_name(label)
    if size < 32:
        raise ConfigError(f"size={size}: must be at least 32 pixels")
    # Every draw below happens whatever the label, so one seed gives a matched pair of images that differ
    # only by the finding (useful for tests and explanation checks).
    view = view or ("AP" if rng.random() < 0.4 else "PA")
    if view not in ("PA", "AP"):
        raise ConfigError(f"view={view!r}: expected 'PA' or 'AP'")
    a = dict(anatomy) if anatomy is not None else sample_anatomy(rng)
    style = {"gamma": 0.0, "noise": 1.0, "contrast": 1.0, **(style or {})}
    kind = str(rng.choice(_NON_COVID_KINDS, p=_NON_COVID_P))
    finding = "ggo" if label == "covid" else kind
    px = 1.0 / size

    # Image-level pose and breathing jitter.
    angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    scale = rng.uniform(0.92, 1.04)
    shift = rng.uniform(-0.03, 0.03, size=2)
    a["dia"] += rng.uniform(-0.025, 0.025)
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) * px - 0.5
    cos, sin = float(np.cos(angle)), float(np.sin(angle))  # Python floats keep the arrays float32
    X = (cos * xx + sin * yy) / scale - float(shift[0])
    Y = (-sin * xx + cos * yy) / scale + 0.5 - float(shift[1])
    d = X  # signed offset from the midline; d < 0 is the patient's right (image left)
    ad = np.abs(d)
    left = d > 0

    # Heart: tilted ellipse resting on the left hemidiaphragm, magnified in AP, enlarged in cardiomegaly.
    cardio = rng.uniform(1.25, 1.45)
    hscale = (1.1 if view == "AP" else 1.0) * (cardio if finding == "cardiomegaly" else 1.0)
    hw, hh = a["heart_w"] * hscale, a["heart_h"] * hscale**0.7
    dome_l = a["dia"] + a["dia_drop"]
    hx, hy = a["heart_dx"] * hscale**0.5, dome_l - 0.45 * hh
    ht = np.deg2rad(30.0)
    hu = (np.cos(ht) * (d - hx) + np.sin(ht) * (Y - hy)) / hw
    hv = (-np.sin(ht) * (d - hx) + np.cos(ht) * (Y - hy)) / hh
    heart = hu**2 + hv**2 < 1.0

    # Lungs: two quarter-ellipse walls meeting at a rounded apex, mediastinal border, domed diaphragm.
    lung_w, apex_c = a["lung_w"], a["apex_c"]
    t = Y - a["apex"]
    grow_lat = np.sqrt(1.0 - (1.0 - np.clip(t / 0.5, 0.0, 1.0)) ** 2)
    grow_med = np.sqrt(1.0 - (1.0 - np.clip(t / 0.14, 0.0, 1.0)) ** 2)
    lateral = apex_c + (lung_w - apex_c) * grow_lat
    knob = 0.025 * np.exp(-(((t - 0.15) / 0.035) ** 2)) * left  # aortic knob on the left
    hilar_bulge = 0.012 * np.exp(-(((t - 0.30) / 0.06) ** 2))
    med_line = a["med_w"] + 0.02 * np.clip((t - 0.2) / 0.3, 0.0, 1.0) + knob + hilar_bulge
    medial = apex_c - (apex_c - med_line) * grow_med
    dome = a["dia"] + a["dia_drop"] * left
    peak = 0.55 * lung_w
    dia_y = (
        dome
        + 0.09 * (np.clip(ad - peak, 0.0, None) / (lung_w - peak)) ** 2
        + 0.05 * (np.clip(peak - ad, 0.0, None) / peak) ** 2
    )
    lungs = (ad < lateral) & (ad > medial) & (Y < dia_y) & (t > 0) & ~heart
    lungs = _two_largest(lungs)  # drop pixel-sized islands where the heart meets the diaphragm
    mask = lungs.astype(np.uint8)

    # Attenuation map: soft tissue thickness, lungs remove tissue, bones and heart add.
    body_half = a["body_w"] + 0.06 * np.clip((0.25 - Y) / 0.2, 0.0, 1.0)
    tissue = np.sqrt(np.clip(1.0 - (d / body_half) ** 2, 0.0, 1.0)) ** 0.7 * a["density"]
    tex = np.random.default_rng(int(a["tex_seed"]))  # patient-specific lung texture, same for every image
    # Vessels radiate from each hilum: angular stripes bent by a smooth field, fading towards the periphery.
    hilum_y = a["apex"] + 0.30
    r = np.hypot(ad - med_line, Y - hilum_y)
    theta = np.arctan2(Y - hilum_y, ad - med_line + 1e-6) + 0.12 * _smooth_noise(tex, size, 0.05)
    bend = 0.6 * _smooth_noise(tex, size, 0.02)
    vessels = np.exp(-((np.sin(7.0 * theta + bend) / 0.3) ** 2))
    vessels += 0.6 * np.exp(-((np.sin(13.0 * theta + 2 * bend) / 0.18) ** 2)) * (r > 0.07)
    markings = vessels * np.exp(-r / 0.15) + 0.5 * np.exp(-((r / 0.045) ** 2))
    lung_soft = gaussian_filter(lungs.astype(np.float32), sigma=max(0.7, size / 256))
    depth = np.clip((lateral - ad) / 0.08, 0.0, 1.0) * np.clip((dia_y - Y) / 0.12, 0.0, 1.0)
    zone = 0.08 * np.clip((t - 0.35) / 0.3, 0.0, 1.0) + 0.06 * np.clip((0.08 - t) / 0.08, 0.0, 1.0)
    air = lung_soft * (0.64 + 0.1 * depth - zone)
    heart_soft = gaussian_filter(heart.astype(np.float32), sigma=max(0.7, size / 256))
    trachea = np.exp(-((d / 0.012) ** 4)) * (t < 0.22) * np.clip((0.24 - t) / 0.05, 0.0, 1.0)
    att = tissue * (1.0 - air - 0.18 * trachea) + 0.06 * heart_soft * tissue + 0.22 * markings * lung_soft
    att += _bones(Y, d, ad, a, view, size) * (tissue > 0)
    gy = a["dia"] + a["dia_drop"] + 0.07  # gastric bubble under the left dome, of varying size
    gastric = np.exp(-(((d - rng.uniform(0.12, 0.2)) / 0.045) ** 2) - ((Y - gy) / 0.03) ** 2)
    att -= rng.uniform(0.0, 0.25) * gastric * tissue

    # Findings.
    extent = 0.0
    lesion_rng = np.random.default_rng(rng.integers(2**63))
    if finding == "ggo":
        extent, opac = _ggo(lesion_rng, size, lungs, lung_soft, Y, ad, lateral, medial, left, a["apex"])
        att += opac * tissue
    elif finding == "consolidation":
        extent, opac = _consolidation(lesion_rng, size, lungs, lung_soft, left)
        att += opac * tissue

    # Exposure: Beer-Lambert, heel-effect gradient, gamma, contrast, blur and quantum noise.
    k = rng.uniform(1.5, 2.1)
    img = (1.0 - np.exp(-k * att)) / (1.0 - np.exp(-k * 1.9))
    img *= 1.0 + rng.uniform(-0.06, 0.06) * (Y - 0.5) + rng.uniform(-0.04, 0.04) * d
    gamma = float(np.exp(rng.uniform(-0.3, 0.3) + style["gamma"]))
    contrast = rng.uniform(0.85, 1.05) * style["contrast"]
    offset = rng.uniform(-0.05, 0.04)
    img = np.clip(img, 0.0, 1.0) ** gamma * contrast + offset
    img = gaussian_filter(img, sigma=rng.uniform(0.4, 1.0) * size / 256)
    noise = rng.uniform(0.006, 0.022) * style["noise"]
    img = img + noise * rng.standard_normal(img.shape) + 0.5 * noise * _smooth_noise(rng, size, 0.01)
    image = np.clip(img, 0.0, 1.0).astype(np.float32)
    info = {
        "label": label,
        "finding": finding,
        "view": view,
        "extent": round(float(extent), 4),
        "gamma": round(gamma, 4),
        "noise": round(float(noise), 4),
        "angle_deg": round(float(np.rad2deg(angle)), 3),
    }
    return image, mask, info


def _two_largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 2:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(sizes)[-2:] + 1
    return np.isin(labels, keep)


def _label_name(label: str | int) -> str:
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < len(LABELS):
        return LABELS[int(label)]
    if label in LABELS:
        return str(label)
    raise ConfigError(f"label={label!r}: expected one of {LABELS} or 0/1")


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed with ``sigma`` given as a fraction of the image size."""
    sigma_px = max(sigma * size, 0.5)
    step = max(1, int(sigma_px // 2))  # wide fields: filter a coarse grid and upsample, same look, far cheaper
    n = size if step == 1 else -(-size // step) + 1
    field = gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), sigma=sigma_px / step, mode="wrap")
    if step > 1:
        field = ndimage.zoom(field, step, order=1, grid_mode=False)[:size, :size]
    return field / (field.std() + 1e-8)


def _band(dist: np.ndarray, half: float) -> np.ndarray:
    """A bone-like band: flat-topped with brighter cortical edges."""
    r2 = np.minimum((dist / half) ** 2, 4.0)
    return np.exp(-(r2 * r2 * r2)) * (0.7 + 0.3 * np.minimum(r2, 1.0))


def _bones(Y: np.ndarray, d: np.ndarray, ad: np.ndarray, a: dict[str, float], view: str, size: int) -> np.ndarray:
    out = np.zeros_like(Y)
    lat = np.clip((a["body_w"] - 0.02 - ad) / 0.03, 0.0, 1.0)  # bones stop at the chest wall
    # Ribs are periodic in Y after removing their curve, so one band evaluation draws all of them.
    gap = a["rib_gap"]
    u = Y - (a["apex"] - 0.015) - (-0.10 * ad + 1.5 * ad**2)  # posterior: rise from the spine, arch, fall
    idx = np.floor(u / gap + 0.5)
    out += (
        0.11 * _band(u - idx * gap, 0.010 + 0.0012 * np.clip(idx, 0, 10)) * lat * (ad > 0.03) * (idx >= 0) * (idx < 11)
    )
    gap_a = 1.15 * gap
    u = Y - (a["apex"] + 0.02) - 0.45 * np.clip(0.34 - ad, 0.0, None)  # anterior: fall towards the sternum
    idx = np.floor(u / gap_a + 0.5)
    out += 0.035 * _band(u - idx * gap_a, 0.013) * lat * (ad > 0.08) * (ad < 0.36) * (idx >= 0) * (idx < 6)
    # Clavicles: medial end low, lateral end high (flatter in AP).
    tilt = 0.08 if view == "AP" else 0.2
    yc = a["apex"] + 0.055 - tilt * (ad - 0.05) + 0.5 * np.clip(ad - 0.22, 0.0, None) ** 2
    out += 0.22 * _band(Y - yc, 0.013) * np.clip((ad - 0.03) / 0.02, 0.0, 1.0) * np.clip((0.3 - ad) / 0.03, 0.0, 1.0)
    # Spine with vertebral bodies and disc spaces.
    discs = 1.0 - 0.35 * np.exp(-(((((Y - a["apex"]) % 0.055) - 0.0275) / 0.006) ** 2))
    out += 0.14 * _band(d, 0.045) * discs + 0.05 * _band(ad - 0.04, 0.008) * (discs < 0.9)
    # Scapulae: lateral wedges, projected over the lungs in AP views.
    sc_x = a["lung_w"] - (0.06 if view == "AP" else -0.03)
    wedge = np.exp(-(((ad - sc_x) / 0.05) ** 2) - (((Y - a["apex"] - 0.18) / 0.15) ** 2))
    out += (0.12 if view == "AP" else 0.07) * wedge
    # Humeral heads in the upper corners.
    out += 0.35 * np.exp(-((np.hypot(ad - a["body_w"] - 0.02, Y - a["apex"] + 0.01) / 0.06) ** 8))
    return out


def _ggo(rng, size, lungs, lung_soft, Y, ad, lateral, medial, left, apex) -> tuple[float, np.ndarray]:
    """Bilateral, peripheral, lower-zone ground glass; ``extent`` is the involved share of each lung."""
    extent = 0.05 + 0.75 * rng.beta(1.4, 2.2)  # many mild cases keep the task from being trivial
    blobs = _smooth_noise(rng, size, 0.03) + 0.4 * _smooth_noise(rng, size, 0.01)
    periph = np.clip((ad - medial) / np.maximum(lateral - medial, 1e-3), 0.0, 1.0)
    lower = np.clip((Y - apex - 0.12) / 0.4, 0.0, 1.0)
    score = blobs + 3.0 * periph * (0.15 + 0.85 * lower)
    involved = np.zeros_like(score)
    for side in (left, ~left):  # threshold each lung on its own so that both are involved
        inside = lungs & side
        if inside.any():
            share = float(np.clip(extent * rng.uniform(0.6, 1.0), 0.02, 0.95))
            thr = np.quantile(score[inside], 1.0 - share)
            involved += (1.0 / (1.0 + np.exp(-(score - thr) / 0.25))) * inside
    density = rng.uniform(0.10, 0.22) + 0.12 * extent
    opac = gaussian_filter(involved, sigma=size * 0.01) * density
    return float(extent), opac * lung_soft


def _consolidation(rng, size, lungs, lung_soft, left) -> tuple[float, np.ndarray]:
    """One focal consolidation in one lung (any zone), denser and sharper than ground glass."""
    side = left if rng.random() < 0.5 else ~left
    cand = np.flatnonzero(lungs & side)
    if cand.size == 0:
        return 0.0, np.zeros_like(lung_soft)
    cy, cx = np.unravel_index(cand[rng.integers(cand.size)], lungs.shape)
    radius = rng.uniform(0.04, 0.09) * size
    yy, xx = np.ogrid[:size, :size]
    r = np.hypot(yy - cy, (xx - cx) * rng.uniform(0.7, 1.3)) / radius
    r = r + 0.35 * _smooth_noise(rng, size, 0.02)
    blob = np.clip(1.5 - r, 0.0, 1.0) * lungs * side
    opac = gaussian_filter(blob.astype(np.float32), sigma=size * 0.006) * rng.uniform(0.3, 0.6)
    return float(blob.sum() / max(lungs.sum(), 1)), opac


def make_cohort(
    out_dir: str | os.PathLike[str],
    n_patients: int = 200,
    seed: int = 0,
    size: int = 256,
    dicom_fraction: float = 0.3,
    plant_marker: float = 0.0,
) -> Path:
    """Write a synthetic cohort (images, lung masks, manifest) for demos and tests.

    Each patient gets 1-3 images (same anatomy, later study dates), a label (about 40 % covid), one of the
    :data:`SOURCES` and PA/AP views. A ``dicom_fraction`` share of images is written as DICOM (a third
    MONOCHROME1; 16, 12 or 8 bits stored; some with rescale or a window), the rest as 8- or 16-bit PNG. Masks are
    binary PNGs (0/255) in ``masks/``.

    Args:
        out_dir: Output folder (created); holds ``manifest.csv``, ``images/`` and ``masks/``.
        n_patients: Number of patients.
        seed: Seed; the same seed gives identical pixel arrays.
        size: Image size in pixels.
        dicom_fraction: Share of images written as DICOM, in ``[0, 1]``.
        plant_marker: Strength in ``[0, 1]`` of a planted shortcut: above 0 every image of a site carries the
            site's burned-in mark (:func:`plant_site_marker`), and each site's covid prevalence moves this share of
            the way to :data:`MARKER_PREVALENCE` (0.85 / 0.10 / 0.40), so the mark predicts the label. 0 leaves
            the cohort exactly as without it.

    Returns:
        Path of ``manifest.csv`` (columns ``image,mask,label,patient_id,source,view,study_date``; paths relative
        to it).

    Raises:
        ConfigError: Invalid counts or fractions.
    """
    if n_patients < 1:
        raise ConfigError(f"n_patients={n_patients}: must be at least 1")
    if not 0.0 <= dicom_fraction <= 1.0:
        raise ConfigError(f"dicom_fraction={dicom_fraction}: must be in [0, 1]")
    if not isinstance(plant_marker, int | float) or isinstance(plant_marker, bool) or not 0.0 <= plant_marker <= 1.0:
        raise ConfigError(f"plant_marker={plant_marker!r}: must be a number in [0, 1]")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    names = list(SOURCES)
    rows = []
    for p in range(n_patients):
        rng = np.random.default_rng([seed, p])  # per-patient stream: patients do not depend on each other
        source = names[p % len(names)]
        prevalence, style = SOURCES[source]
        prevalence += plant_marker * (MARKER_PREVALENCE[source] - prevalence)
        label = LABELS[int(rng.random() < prevalence)]
        anatomy = sample_anatomy(rng)
        pid = f"P{p:04d}"
        start, span = (dt.date(2020, 3, 1), 650) if label == "covid" else (dt.date(2018, 6, 1), 1300)
        date = start + dt.timedelta(days=int(rng.integers(0, span)))
        ap_bias = rng.uniform(0.2, 0.6)
        for k in range(int(rng.integers(1, 4))):
            view = "AP" if rng.random() < ap_bias else "PA"
            image, mask, _ = draw_cxr(rng, label, size, view=view, anatomy=anatomy, style=style)
            if plant_marker > 0:
                image = plant_site_marker(image, source)
            stem = f"{pid}_{k + 1:02d}"
            mask_rel = f"masks/{stem}.png"
            save_png(out / mask_rel, mask * np.uint8(255))
            study_date = date.strftime("%Y%m%d")
            if rng.random() < dicom_fraction:
                img_rel = f"images/{stem}.dcm"
                _write_synth_dicom(rng, out / img_rel, image, view, pid, study_date, f"{seed}/{stem}")
            else:
                img_rel = f"images/{stem}.png"
                save_png(out / img_rel, image, bit_depth=16 if rng.random() < 0.3 else 8)
            rows.append(
                {
                    "image": img_rel,
                    "mask": mask_rel,
                    "label": label,
                    "patient_id": pid,
                    "source": source,
                    "view": view,
                    "study_date": date.isoformat(),
                }
            )
            date += dt.timedelta(days=int(rng.integers(1, 15)))
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    n_covid = sum(r["label"] == "covid" for r in rows)
    logger.info("wrote %d images of %d patients (%d covid) to %s", len(rows), n_patients, n_covid, out)
    return manifest


def plant_site_marker(image: np.ndarray, source: str) -> np.ndarray:
    """Burn a site's mark into an image: a bright block of text-like bars at the site's corner (outside the lungs).

    Args:
        image: float32 image in ``[0, 1]``.
        source: One of :data:`SOURCES`.

    Returns:
        A marked copy.

    Raises:
        ConfigError: Unknown source.
    """
    if source not in MARKER_CORNERS:
        raise ConfigError(f"source={source!r}: no marker for it (sites: {', '.join(MARKER_CORNERS)})")
    out = np.array(image, dtype=np.float32, copy=True)
    n = out.shape[0]
    top, left = (round(f * n) for f in MARKER_CORNERS[source])
    height, width = max(4, n // 12), max(6, n * 3 // 16)
    block = out[top:top + height, left:left + width]
    block[:] = 0.15
    bar = max(1, height // 4)
    for row in range(0, height, 2 * bar):  # bars of decreasing length read like a burned-in text label
        length = max(2, width - (row // (2 * bar)) * width // 4)
        block[row:row + bar, :length] = 1.0
    return out


def _write_synth_dicom(rng, path, image, view, pid, study_date, uid_key) -> None:
    from pydicom.uid import generate_uid

    photometric = "MONOCHROME1" if rng.random() < 1 / 3 else "MONOCHROME2"
    bits = int(rng.choice([16, 12, 8], p=[0.5, 0.3, 0.2]))
    rescale = (1.0, -1024.0) if rng.random() < 0.3 else None
    top = 2**bits - 1
    offset = rescale[1] if rescale else 0.0
    # A full-range window is an identity mapping, so the file still decodes to ``image``.
    window = ((top + 1) / 2 + offset, top + 1) if rng.random() < 0.3 else None
    write_dicom(
        path,
        image,
        photometric=photometric,
        bits_stored=bits,
        view=view,
        patient_id=pid,
        study_date=study_date,
        window=window,
        rescale=rescale,
        instance_uid=generate_uid(entropy_srcs=[uid_key]),
    )


PICTURE_KINDS = ("noise", "smooth_noise", "gradient", "radial", "shapes", "text", "stripes", "checkerboard", "blank")


def draw_picture(rng: np.random.Generator, kind: str | None = None, size: int | tuple[int, int] | None = None
                 ) -> np.ndarray:
    """Draw one synthetic picture that is not a chest X-ray (for the input-type check and its tests).

    Args:
        rng: Random generator (the only source of randomness).
        kind: One of :data:`PICTURE_KINDS`; None draws one.
        size: ``(height, width)`` or a side; None draws 64-512 pixels per side.

    Returns:
        float32 ``H x W`` image in [0, 1].

    Raises:
        ConfigError: Unknown kind.
    """
    from PIL import Image, ImageDraw

    kind = kind if kind is not None else str(rng.choice(PICTURE_KINDS))
    if kind not in PICTURE_KINDS:
        raise ConfigError(f"picture kind {kind!r}: expected one of {PICTURE_KINDS}")
    if size is None:
        h, w = (int(v) for v in rng.integers(64, 513, size=2))
    else:
        h, w = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    if kind == "noise":
        img = rng.random((h, w)) if rng.random() < 0.5 else rng.normal(0.5, rng.uniform(0.05, 0.3), (h, w))
    elif kind == "smooth_noise":
        img = gaussian_filter(rng.normal(size=(h, w)), rng.uniform(2, 20))
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        img = np.cos(a) * xx + np.sin(a) * yy
    elif kind == "radial":
        cy, cx = rng.uniform(0, h / max(h, w)), rng.uniform(0, w / max(h, w))
        r = np.hypot(yy - cy, xx - cx)
        img = np.sin(rng.uniform(5, 60) * r) if rng.random() < 0.5 else -r
    elif kind == "stripes":
        a = rng.uniform(0, np.pi)
        img = np.sin(rng.uniform(10, 80) * (np.cos(a) * xx + np.sin(a) * yy))
    elif kind == "checkerboard":
        n = rng.uniform(3, 16)
        img = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(float)
    elif kind == "blank":
        img = np.full((h, w), rng.uniform(0, 1)) + rng.normal(0, 0.01, (h, w))
    else:  # shapes or text on a plain background
        canvas = Image.new("L", (w, h), int(rng.integers(0, 256)))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(2, 12))):
            fill = int(rng.integers(0, 256))
            if kind == "text":
                x0, y0 = int(rng.integers(0, max(w - 20, 1))), int(rng.integers(0, max(h - 10, 1)))
                word = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnop0123456789"), 20))
                draw.text((x0, y0), word, fill=fill, font_size=float(rng.uniform(8, 48)))
            else:
                x0, x1 = sorted(rng.integers(0, w, 2).tolist())
                y0, y1 = sorted(rng.integers(0, h, 2).tolist())
                shape = rng.integers(0, 3)
                if shape == 0:
                    draw.ellipse((x0, y0, x1, y1), fill=fill)
                elif shape == 1:
                    draw.rectangle((x0, y0, x1, y1), fill=fill)
                else:
                    draw.polygon([tuple(p) for p in rng.integers(0, (w, h), (int(rng.integers(3, 7)), 2)).tolist()],
                                 fill=fill)
        img = np.asarray(canvas, dtype=np.float64)
    img = np.asarray(img, dtype=np.float64)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi - lo > 1e-9 else np.clip(img, 0, 1)
    return img.astype(np.float32)
