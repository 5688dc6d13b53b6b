"""Vectorised uint8 rendering of the tabletop scene: precomputed sprites + indexed compositing.

Every drawable thing (object of a given shape and colour, plate of a given colour, open / closed
gripper) is a *sprite*: a list of pixel offsets ``(dy, dx)`` from its centre pixel with an RGB
value each, precomputed once per camera scale.  Drawing a layer for all N envs is one
``scatter_`` into the flat uint8 frame buffer: the pixel offsets of each env's sprite are
shifted to its position; pixels off the image are sent to a scratch "trash" frame.  No float
image is ever materialised, so the cost is proportional to the number of sprite pixels, not to
``N * S * S`` per object.

Coordinates: the table is ``[-1, 1]^2`` with ``x`` to the right and ``y`` up.  The *top*
camera sees the whole table (``S / 2`` pixels per unit); the *wrist* camera is a gripper-centred
view of half-width :data:`WRIST_HALF_WIDTH` (a higher-resolution local view).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pirl.envs.tabletop.tasks import COLOURS, SHAPES

# Geometry shared with the simulator (table units).
# Objects are ~9 px wide in a 64 px top view, so that their shapes stay distinguishable.
CUBE_HALF = 0.13
DISC_RADIUS = 0.14
TRIANGLE_RADIUS = 0.19  # circumradius of the upward-pointing equilateral triangle
PLATE_HALF = 0.20
GRIPPER_RADIUS = 0.06  # physical contact radius
GRIPPER_FINGER_OPEN = 0.12  # finger offsets from the centre when drawn open / closed
GRIPPER_FINGER_CLOSED = 0.075
GRIPPER_FINGER_WIDTH = 0.018
EDGE_ZONE = 0.75  # |coordinate| beyond which an object is "at the edge"
WRIST_HALF_WIDTH = 0.45
PIXEL_EPS = 1e-3  # pixels

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (235, 200, 30),
}
TABLE_RGB = (205, 190, 165)
EDGE_RGB = (170, 155, 130)
OUTSIDE_RGB = (35, 35, 35)
GRIPPER_OPEN_RGB = (70, 70, 70)
GRIPPER_CLOSED_RGB = (15, 15, 15)


@dataclass
class SpriteTable:
    """A set of K sprites padded to a common pixel count P.

    dy, dx: ``[K, P]`` int64 pixel offsets from the centre pixel (row offset down, col right);
    rgb: ``[K, P, 3]`` uint8.  Padding repeats a sprite's last pixel (writing the same value to
    the same place twice is harmless), so no validity mask is needed when drawing.
    """

    dy: torch.Tensor
    dx: torch.Tensor
    rgb: torch.Tensor

    @property
    def extent(self) -> int:
        """Largest |offset| in pixels."""
        return int(max(self.dy.abs().max(), self.dx.abs().max()))

    def flat_offsets(self, width: int) -> torch.Tensor:
        """``[K, P, 3]`` offsets into a planar ``[3, width, width]`` frame."""
        chan = torch.arange(3, dtype=torch.long) * width * width
        return (self.dy * width + self.dx)[..., None] + chan


def _inside(kind: str, u: torch.Tensor, v: torch.Tensor, shrink: float = 0.0) -> torch.Tensor:
    """Inside test of a shape centred at 0 in table units (``u`` right, ``v`` up), float64."""
    if kind == "cube":
        return torch.maximum(u.abs(), v.abs()) <= CUBE_HALF - shrink
    if kind == "disc":
        return u.pow(2) + v.pow(2) <= (DISC_RADIUS - shrink) ** 2
    if kind == "triangle":
        r = TRIANGLE_RADIUS
        # Edges: bottom v = -r/2, sides v = r - sqrt(3)|u|; an inward offset of `shrink`
        # moves each edge by shrink along its normal (side normals have length 2 in (u, v)).
        return (v >= -r / 2 + shrink) & (v <= r - math.sqrt(3.0) * u.abs() - 2.0 * shrink)
    if kind == "plate":
        return torch.maximum(u.abs(), v.abs()) <= PLATE_HALF - shrink
    raise ValueError(kind)


def _sprite(kind: str, rgb_fill, rgb_border, ppu: float, border_px: float = 1.0):
    """Pixel offsets and colours of one sprite at ``ppu`` pixels per table unit."""
    extent = {"cube": CUBE_HALF * 1.5, "disc": DISC_RADIUS, "triangle": TRIANGLE_RADIUS,
              "plate": PLATE_HALF * 1.5, "open": GRIPPER_FINGER_OPEN + 0.05,
              "closed": GRIPPER_FINGER_OPEN + 0.05}[kind]
    k = int(math.ceil(extent * ppu)) + 1
    off = torch.arange(-k, k + 1, dtype=torch.float64)
    dy, dx = torch.meshgrid(off, off, indexing="ij")
    u, v = dx / ppu, -dy / ppu  # pixel centres relative to the sprite centre
    b = border_px / ppu
    if kind in ("open", "closed"):  # a two-finger claw seen from above: palm bar + fingers
        spread = GRIPPER_FINGER_OPEN if kind == "open" else GRIPPER_FINGER_CLOSED
        w = max(GRIPPER_FINGER_WIDTH, 0.5 / ppu)
        finger = ((u.abs() - spread).abs() <= w) & (v >= -0.06) & (v <= 0.1)
        palm = (u.abs() <= spread + w) & (v >= 0.1 - 2 * w) & (v <= 0.1)
        inside = finger | palm
        border = torch.zeros_like(inside)
    else:
        inside = _inside(kind, u, v)
        border = inside & ~_inside(kind, u, v, shrink=b)
    sel = inside.flatten()
    fill = torch.tensor(rgb_fill, dtype=torch.uint8).expand(int(sel.sum()), 3).clone()
    is_border = border.flatten()[sel]
    fill[is_border] = torch.tensor(rgb_border, dtype=torch.uint8)
    return dy.flatten()[sel].long(), dx.flatten()[sel].long(), fill


def _table(sprites: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> SpriteTable:
    p = max(sp[0].numel() for sp in sprites)
    pad = lambda x: torch.cat([x, x[-1:].expand(p - x.shape[0], *x.shape[1:])])  # noqa: E731
    return SpriteTable(torch.stack([pad(a) for a, _, _ in sprites]),
                       torch.stack([pad(b) for _, b, _ in sprites]),
                       torch.stack([pad(c) for _, _, c in sprites]))


def _mix(rgb, other, w: float) -> tuple[int, int, int]:
    return tuple(int(round((1 - w) * a + w * b)) for a, b in zip(rgb, other))


def build_sprites(ppu: float) -> dict[str, SpriteTable]:
    """Sprite tables at ``ppu`` pixels per table unit.

    ``objects``: index ``shape * len(COLOURS) + colour``; ``plates``: index ``colour``;
    ``gripper``: 0 open, 1 closed.
    """
    objects = []
    for shape in SHAPES:
        for colour in COLOURS:
            c = PALETTE[colour]
            objects.append(_sprite(shape, c, _mix(c, (0, 0, 0), 0.55), ppu))
    plates = []
    for colour in COLOURS:
        c = PALETTE[colour]
        plates.append(_sprite("plate", _mix(c, (255, 255, 255), 0.6), _mix(c, (0, 0, 0), 0.1),
                              ppu, border_px=max(1.0, 0.03 * ppu)))
    gripper = [_sprite("open", GRIPPER_OPEN_RGB, GRIPPER_OPEN_RGB, ppu),
               _sprite("closed", GRIPPER_CLOSED_RGB, GRIPPER_CLOSED_RGB, ppu)]
    return {"objects": _table(objects), "plates": _table(plates), "gripper": _table(gripper)}


class Camera:
    """One camera of N envs: a square view of ``size`` pixels, either the whole table (``"top"``)
    or a window of half-width :data:`WRIST_HALF_WIDTH` centred on the gripper (``"wrist"``).

    Frames are drawn straight into the caller's flat uint8 frame buffer; sprite pixels that fall
    off the view are redirected to a scratch ("trash") frame at the end of that buffer.  The top
    camera caches each env's static layer (table + plates, which never move), refreshed by
    :meth:`set_static` when envs are reset; each step it copies that layer and draws the objects
    and the gripper.  The wrist camera draws table, edge zones and plates as a separable label
    map (:meth:`_background_for`) and the objects and the gripper as sprites.
    """

    def __init__(self, kind: str, size: int, num_envs: int, device: torch.device):
        if kind not in ("top", "wrist"):
            raise ValueError(f"camera kind must be 'top' or 'wrist', got {kind!r}")
        self.kind, self.size, self.num_envs, self.device = kind, size, num_envs, device
        self.half_width = 1.0 if kind == "top" else WRIST_HALF_WIDTH
        self.ppu = size / (2.0 * self.half_width)
        tables = build_sprites(self.ppu)
        if kind == "wrist":  # the wrist camera draws plates in its background, not as sprites
            del tables["plates"]
        self.frame_numel = 3 * size * size
        self.sprites = {k: (t.dy.to(device), t.dx.to(device), t.rgb.to(device))
                        for k, t in tables.items()}
        self._chan = torch.arange(3, device=device) * size * size
        # Palette of the label maps: table, edge zone, off-table, then (fill, border) per plate
        # colour, the same colours as the plate sprites.
        self._plate_border = max(1.0, 0.03 * self.ppu)
        palette = [TABLE_RGB, EDGE_RGB, OUTSIDE_RGB]
        for colour in COLOURS:
            c = PALETTE[colour]
            palette += [_mix(c, (255, 255, 255), 0.6), _mix(c, (0, 0, 0), 0.1)]
        self._palette_planar = torch.tensor(palette, dtype=torch.uint8).t().contiguous().to(device)
        self._buffers: dict[str, torch.Tensor] = {}
        # Pixel-centre coordinates along one axis, relative to the view centre (table units).
        ramp = torch.arange(size, device=device, dtype=torch.float32)
        self._axis = ((ramp + 0.5) / size * 2 - 1) * self.half_width
        self._static: torch.Tensor | None = None
        if kind == "top":
            self._background = self._background_for(torch.zeros(1, 2, device=device))[0]
            # N static frames + 1 trash frame, flat
            self._static = torch.zeros((num_envs + 1) * self.frame_numel, dtype=torch.uint8,
                                       device=device)

    def _workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
        """A persistent scratch buffer (avoids re-allocating and page-faulting big temporaries)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf

    def _background_for(self, centre: torch.Tensor, plate_pos: torch.Tensor | None = None,
                        plate_colour: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """Background ``[K, 3, S, S]`` uint8 for views centred at ``centre [K, 2]``: table, edge
        zones (``|coordinate| > EDGE_ZONE``), off-table, and optionally the (axis-aligned,
        square) plates ``[K, P, 2]`` / ``[K, P]``.

        All of these are separable: a pixel's colour depends only on its row's *code* (edge
        zone of y, and for each plate whether y is outside / on the border / inside) and its
        column's code.  So each env gets a small colour table ``[codes, codes]`` and the frame
        is one gather ``table[row_code, col_code]`` per colour channel (written into ``out``
        ``[K, 3, S, S]`` if given)."""
        k = centre.shape[0]
        xs = centre[:, 0:1] + self._axis  # [K, S] column x coordinates
        ys = centre[:, 1:2] - self._axis  # [K, S] row y coordinates (rows go down)
        npl = 0 if plate_pos is None else plate_pos.shape[1]
        b = self._plate_border / self.ppu

        def codes(coord: torch.Tensor, axis: int) -> torch.Tensor:
            code = (coord.abs() > EDGE_ZONE).long() + (coord.abs() > 1.0).long()
            mult = 3
            for p in range(npl):
                d = (coord - plate_pos[:, p, axis:axis + 1]).abs()
                state = (d <= PLATE_HALF).long() + (d <= PLATE_HALF - b).long()
                code = code + mult * state
                mult *= 3
            return code  # [K, S] in [0, 3^(1+P))

        ncode = 3 ** (1 + npl)
        row, col = codes(ys, 1), codes(xs, 0)
        # label table per env over (row code, col code)
        cr = torch.arange(ncode, device=centre.device)
        label = torch.maximum((cr % 3)[:, None], (cr % 3)[None, :]).expand(k, ncode, ncode)
        mult = 3
        for p in range(npl):
            st = (cr // mult) % 3
            mult *= 3
            outer = (st[:, None] >= 1) & (st[None, :] >= 1)
            inner = (st[:, None] == 2) & (st[None, :] == 2)
            plate = (3 + 2 * plate_colour[:, p]).view(k, 1, 1) + (~inner).long()
            label = torch.where(outer, plate, label)
        # per-channel colour tables [3, K * ncode^2] and one flat index per pixel
        # (index_select is much faster than advanced indexing on CPU)
        tables = self._palette_planar.index_select(1, label.reshape(-1))
        offset = (torch.arange(k, device=centre.device) * ncode * ncode)[:, None] + row * ncode
        idx = self._workspace("bg_idx", (k, self.size, self.size), torch.long, centre.device)
        torch.add(offset[:, :, None], col[:, None, :], out=idx)
        if out is None:
            out = torch.empty(k, 3, self.size, self.size, dtype=torch.uint8, device=centre.device)
        flat_idx = idx.view(-1)
        for c in range(3):
            out[:, c] = tables[c].index_select(0, flat_idx).view(k, self.size, self.size)
        return out

    def pixel(self, pos: torch.Tensor,
              centre: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) int64 of table points ``pos [..., 2]`` in this view (``centre [K, 2]``
        for the wrist camera, broadcast against pos's leading dims)."""
        if centre is not None:
            while centre.dim() < pos.dim():
                centre = centre.unsqueeze(-2)
            pos = pos - centre
        # (+ PIXEL_EPS: points exactly on a pixel boundary, e.g. the wrist view's own centre,
        # land in the same pixel whatever the float rounding)
        col = torch.floor((pos[..., 0] + self.half_width) * self.ppu + PIXEL_EPS).long()
        row = torch.floor((self.half_width - pos[..., 1]) * self.ppu + PIXEL_EPS).long()
        return row, col

    def _draw(self, flat: torch.Tensor, layer: str, sid: torch.Tensor, row: torch.Tensor,
              col: torch.Tensor, base: torch.Tensor, trash: int) -> None:
        """Draw sprites ``sid [M]`` of ``layer`` centred at pixel ``(row, col) [M]`` into the
        frames starting at ``base [M]`` of the flat buffer ``flat``; off-view pixels go to the
        scratch frame at ``trash``."""
        s = self.size
        dy, dx, rgb = self.sprites[layer]
        r = row[:, None] + dy.index_select(0, sid)  # [M, P]
        c = col[:, None] + dx.index_select(0, sid)
        ok = (r >= 0) & (r < s) & (c >= 0) & (c < s)
        pix = torch.where(ok, base[:, None] + r * s + c, trash)
        idx = pix[..., None] + self._chan  # [M, P, 3]
        # duplicate targets within one layer only come from sprite padding (identical values)
        # and from the trash frame, so scatter_'s unspecified write order does not matter
        flat.scatter_(0, idx.view(-1), rgb.index_select(0, sid).view(-1))

    def set_static(self, idx: torch.Tensor, plate_pos: torch.Tensor,
                   plate_colour: torch.Tensor) -> None:
        """Top camera: redraw the static layer of envs ``idx [K]`` (plates ``[K, P, 2]``)."""
        if self._static is None:
            return
        n, f = self.num_envs, self.frame_numel
        frames = self._static[: n * f].view(n, 3, self.size, self.size)
        frames[idx] = self._background.expand(idx.shape[0], *self._background.shape)
        npl = plate_pos.shape[1]
        row, col = self.pixel(plate_pos, None)
        self._draw(self._static, "plates", plate_colour.reshape(-1), row.reshape(-1),
                   col.reshape(-1), (idx * f).repeat_interleave(npl), n * f)

    def render(self, flat: torch.Tensor, out: torch.Tensor, base: torch.Tensor, trash: int,
               gripper: torch.Tensor, closed: torch.Tensor, obj_pos: torch.Tensor,
               obj_sprite: torch.Tensor, obj_order: torch.Tensor, plate_pos: torch.Tensor,
               plate_colour: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Render K scenes into ``out [K, 3, S, S]`` uint8, a view of the flat buffer ``flat``
        whose frames start at ``base [K]`` and which has a scratch frame at ``trash``.

        gripper: ``[K, 2]``; closed: ``[K]`` bool; obj_pos: ``[K, M, 2]``; obj_sprite: ``[K, M]``
        object sprite ids; obj_order: ``[K, M]`` drawing order (slot indices, last on top);
        plate_pos: ``[K, P, 2]``; plate_colour: ``[K, P]``; idx: ``[K]`` which envs these are
        (None: all N, in order), used to read the top camera's static layer.
        """
        if self.kind == "top":
            assert self._static is not None
            n = self.num_envs
            static = self._static[: n * self.frame_numel].view(n, 3, self.size, self.size)
            out.copy_(static if idx is None else static.index_select(0, idx))
            centre = None
        else:
            self._background_for(gripper, plate_pos, plate_colour, out=out)
            centre = gripper
        # Objects one layer at a time in the given order (held object last, on top).
        orow, ocol = self.pixel(obj_pos, centre)
        for j in range(obj_pos.shape[1]):
            slot = obj_order[:, j:j + 1]
            self._draw(flat, "objects", obj_sprite.gather(1, slot)[:, 0],
                       orow.gather(1, slot)[:, 0], ocol.gather(1, slot)[:, 0], base, trash)
        grow, gcol = self.pixel(gripper, centre)
        self._draw(flat, "gripper", closed.long(), grow, gcol, base, trash)
        return out
