"""Optical flow, warping and the reliability mask of Ruder, Dosovitskiy & Brox 2016 ("Artistic style transfer for
videos", section 3.2), on OpenCV's DIS flow (Kroeger et al. 2016; opencv-python-headless, nothing downloaded).

Conventions: a flow is H x W x 2 float32 (dx, dy) in pixels. `flow(a, b)` is the flow from a to b: a at p shows
what b shows at p + flow(p). So `warp(b, flow(a, b))` is b moved onto a. For frame i and the previous frame i - 1,
the backward flow is flow(frame_i, frame_i-1): it brings the previous stylized frame onto frame i.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from style_transfer.colors import match_colors
from style_transfer.errors import StyleTransferError

# Ruder et al.'s thresholds for |w + w~|^2 > a (|w|^2 + |w~|^2) + b and |grad w~|^2 > c |w~|^2 + d.
OCCLUSION_RELATIVE = 0.01
OCCLUSION_ABSOLUTE = 0.5
BOUNDARY_RELATIVE = 0.01
BOUNDARY_ABSOLUTE = 0.002
# A frame whose reliable share (`reliability`) is below this starts a new shot: nothing of the previous stylized frame
# carries over, and the frame is stylized as the first one is. Within a shot of bikes.mp4 the share stays above 0.77;
# across its cut it falls to about 0, and the chance flow matches left then carried the last shot's picture into the
# new one. Between two unrelated small pictures chance matches reach about a third.
NEW_SHOT_BELOW = 0.5


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise StyleTransferError("video needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def _gray(rgb: np.ndarray) -> np.ndarray:
    cv2 = _cv2()
    pixels = rgb if rgb.dtype == np.uint8 else np.rint(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)
    return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)


def flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """DIS flow from RGB frame a to RGB frame b (uint8, or float in [0, 1]), H x W x 2 float32."""
    cv2 = _cv2()
    # The medium preset with variational refinement: the fast presets leave block artefacts at 256 px.
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(_gray(a), _gray(b), None).astype(np.float32)


def sample_grid(flow_field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions p + flow(p) as cv2.remap's map_x, map_y."""
    h, w = flow_field.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx + flow_field[..., 0], yy + flow_field[..., 1]


def warp(image: np.ndarray, flow_field: np.ndarray) -> np.ndarray:
    """`image` sampled at p + flow(p), bilinearly; outside the frame the nearest edge pixel (the mask marks those
    pixels unreliable)."""
    cv2 = _cv2()
    map_x, map_y = sample_grid(flow_field)
    return cv2.remap(np.ascontiguousarray(image), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def occlusions(backward: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """Where the flows disagree (Ruder et al. eq. 5): H x W bool, True at pixels of frame i that frame i - 1 does
    not show, and at pixels whose backward flow leaves the frame.

    w~ = backward(p) and w = forward(p + w~): a pixel seen in both frames goes there and back, w + w~ = 0; the
    threshold grows with the motion, since flow errors do."""
    h, w = backward.shape[:2]
    there = warp(forward, backward)
    mismatch = np.sum((there + backward) ** 2, axis=2)
    allowed = OCCLUSION_RELATIVE * (np.sum(there**2, axis=2) + np.sum(backward**2, axis=2)) + OCCLUSION_ABSOLUTE
    map_x, map_y = sample_grid(backward)
    outside = (map_x < 0) | (map_x > w - 1) | (map_y < 0) | (map_y > h - 1)
    return (mismatch > allowed) | outside


def motion_boundaries(backward: np.ndarray) -> np.ndarray:
    """Where the backward flow changes fast (Ruder et al. eq. 6): |grad u|^2 + |grad v|^2 > 0.01 |w~|^2 + 0.002,
    H x W bool. Flow is least accurate there."""
    du_dy, du_dx = np.gradient(backward[..., 0])
    dv_dy, dv_dx = np.gradient(backward[..., 1])
    steep = du_dx**2 + du_dy**2 + dv_dx**2 + dv_dy**2
    return steep > BOUNDARY_RELATIVE * np.sum(backward**2, axis=2) + BOUNDARY_ABSOLUTE


def reliability(backward: np.ndarray, occluded: np.ndarray) -> np.ndarray:
    """Ruder et al.'s weights c: 1 where the previous frame, warped by `backward`, may be trusted, 0 at occlusions
    (`occlusions(backward, forward)`, computed once per frame by the caller) and motion boundaries; H x W float32."""
    return (~(occluded | motion_boundaries(backward))).astype(np.float32)


def warped_start(warped: np.ndarray, current: np.ndarray, occluded: np.ndarray) -> np.ndarray:
    """The next frame's starting image: the previous stylized frame warped onto this one (`warped`, 0..1), except
    where this frame shows what the previous did not (`occluded`: occlusions, and picture entering at the borders).

    There the warp has nothing to carry (outside the frame it repeats the edge pixel, which a short optimisation
    leaves as streaks), so that picture starts from the input frame, recoloured (colors.match_colors, "meancov") to
    the colour statistics of the stylized picture around it: from the photograph's own colours it would stay a pale
    band for several frames, since the temporal term does not act there and later frames get few iterations."""
    if not occluded.any():
        return warped.astype(np.float32)
    trusted = warped[~occluded]
    if len(trusted) < 2:  # nothing carries over (a cut): the frame starts as a still's run would
        return current.astype(np.float32)
    recoloured = match_colors(current, trusted.reshape(-1, 1, 3), "meancov")
    return np.where(occluded[..., None], recoloured, warped).astype(np.float32)


def warping_error(current: np.ndarray, previous: np.ndarray, backward: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared difference, on 0-255 values, between `current` and `previous` warped onto it, over the pixels
    the mask trusts (the temporal-consistency figure of the benchmarks)."""
    scale = 255.0 if current.dtype != np.uint8 else 1.0
    a = current.astype(np.float64) * scale
    b = warp(previous.astype(np.float32), backward).astype(np.float64) * scale
    keep = mask > 0.5
    if not keep.any():
        return 0.0
    return float(np.mean(np.sum((a - b) ** 2, axis=2)[keep]) / 3.0)
