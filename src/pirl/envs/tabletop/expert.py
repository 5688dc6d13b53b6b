"""A scripted expert for the tabletop benchmark, acting from the simulator's privileged state.

It is a reactive (state-feedback) controller, vectorised over envs, so it recovers from its own
action noise:

- *pick_place / stack*: open, move to the object, close when it is within reach (and the nearest
  free object), carry it to the plate centre / onto the base cube, open.
- *push*: go around the object (sideways, then behind it, never touching it), line up behind it
  with respect to the goal direction, then push through its centre until it reaches the edge zone.

Waypoints are tracked with a proportional controller ``clip((target - gripper) / max_speed)``,
so actions are smooth and arrive exactly.  ``noise`` adds Gaussian noise of that std to every
action dimension (then clipped to ``[-1, 1]``).
"""

from __future__ import annotations

import torch

from pirl.envs.tabletop.sim import (CONTACT_DISTANCE, FAMILY_PUSH, FAMILY_STACK, GRASP_RADIUS,
                                    TabletopEnv)

_BEHIND = 0.1  # the gripper is "behind" the object if it is this far back along the goal dir
_ALIGNED = 0.06  # lateral tolerance for pushing
PUSH_CLEARANCE = 0.04  # default lateral clearance beyond contact when going around the object
_PLACE_TOL = 0.02


class ScriptedExpert:
    """``expert.act() -> [N, 3]`` actions for the env's current state.

    Args:
        env: the (unwrapped) :class:`TabletopEnv` to read privileged state from.
        noise: std of the Gaussian action noise.
        generator: ``torch.Generator`` for the noise (a fixed-seed one if None).
        clearance: push: how far beyond contact (table units) the gripper passes beside the
            object on its way round it (the contact distance is 0.2).
    """

    def __init__(self, env: TabletopEnv, noise: float = 0.0,
                 generator: torch.Generator | None = None, clearance: float = PUSH_CLEARANCE):
        if clearance < 0:
            raise ValueError(f"clearance must be >= 0, got {clearance}")
        self.env = env
        self.noise = noise
        self.side = CONTACT_DISTANCE + clearance
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def _move_to(self, target: torch.Tensor) -> torch.Tensor:
        """Proportional velocity command ``[N, 2]`` towards ``target [N, 2]``."""
        return ((target - self.env.gripper) / self.env.max_speed).clamp(-1.0, 1.0)

    def clean_action(self) -> torch.Tensor:
        """The noiseless expert action ``[N, 3]``."""
        env = self.env
        g, o = env.gripper, env.obj_pos[:, 0]
        held, closed = env.held, env.closed
        n = g.shape[0]
        one = torch.ones(n, device=g.device)

        # --- pick_place / stack -----------------------------------------------------------
        goal = torch.where((env.family == FAMILY_STACK)[:, None], env.obj_pos[:, 1],
                           env.plate_pos[:, 0])
        at_goal = (g - goal).norm(dim=-1) < _PLACE_TOL
        dist_obj = (g - o).norm(dim=-1)
        free_d = (env.obj_pos - g[:, None, :]).norm(dim=-1)
        target_nearest = free_d.argmin(1) == 0
        can_grasp = ~closed & (dist_obj < GRASP_RADIUS - 0.02) & target_nearest
        carry_move = torch.where(at_goal[:, None], torch.zeros_like(g), self._move_to(goal))
        carry_grip = torch.where(at_goal, -one, one)
        reach_move = torch.where(can_grasp[:, None], torch.zeros_like(g), self._move_to(o))
        reach_grip = torch.where(can_grasp, one, -one)
        pp_move = torch.where((held == 0)[:, None], carry_move, reach_move)
        pp_grip = torch.where(held == 0, carry_grip, reach_grip)

        # --- push -------------------------------------------------------------------------
        u = env.goal_dir
        nrm = torch.stack([-u[:, 1], u[:, 0]], 1)
        rel = g - o
        a = (rel * u).sum(-1)
        b = (rel * nrm).sum(-1)
        behind = a < -_BEHIND
        aligned = b.abs() < _ALIGNED
        # push through the object's centre, biased along the goal direction
        through = (o - g) / (o - g).norm(dim=-1, keepdim=True).clamp_min(1e-6)
        push_move = (through + 0.5 * u)
        push_move = push_move / push_move.abs().amax(-1, keepdim=True).clamp_min(1e-6)
        # behind but off-line: slide sideways to the pre-push point (at a safe distance)
        pre = o - u * (CONTACT_DISTANCE + 0.04)
        line_up = self._move_to(pre)
        # in front / beside: first go sideways (side with room), then back along -u
        on = (o * nrm).sum(-1)
        room_pos, room_neg = 1.0 - on, 1.0 + on
        roomier = torch.where(room_pos >= room_neg, one, -one)
        side = torch.where(b.abs() > 0.02, torch.sign(b), roomier)
        side = torch.where((side > 0) & (room_pos < self.side + 0.05), -one, side)
        side = torch.where((side < 0) & (room_neg < self.side + 0.05), one, side)
        sideways = self._move_to(o + nrm * side[:, None] * (self.side + 0.02) + u * a[:, None])
        backwards = self._move_to(o + nrm * b[:, None] - u * (CONTACT_DISTANCE + 0.04))
        around = torch.where((b.abs() < self.side)[:, None], sideways, backwards)
        push_move = torch.where((behind & aligned)[:, None], push_move,
                                torch.where(behind[:, None], line_up, around))
        push_grip = -one

        is_push = env.family == FAMILY_PUSH
        move = torch.where(is_push[:, None], push_move, pp_move)
        grip = torch.where(is_push, push_grip, pp_grip)
        # holding the wrong object (or anything while pushing): open in place
        drop = (held > 0) | (is_push & (held >= 0))
        move = torch.where(drop[:, None], torch.zeros_like(move), move)
        grip = torch.where(drop, -one, grip)
        return torch.cat([move, grip[:, None]], 1)

    def act(self) -> torch.Tensor:
        """Expert action ``[N, 3]`` with Gaussian noise of std ``noise``, clipped to [-1, 1]."""
        act = self.clean_action()
        if self.noise > 0:
            eps = torch.randn(act.shape, generator=self.generator).to(act.device)
            act = act + self.noise * eps
        return act.clamp(-1.0, 1.0)
