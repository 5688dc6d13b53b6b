#!/usr/bin/env bash
# Real-simulator smoke tests (ManiSkill3, LIBERO) in their own venv, from scratch.
#
#   1. system packages: a Vulkan driver for SAPIEN (Mesa >= 25 lavapipe on CPU-only Debian 12,
#      from bookworm-backports) and EGL / OSMesa for MuJoCo's headless rendering;
#   2. .venv-sim: torch 2.14.1 + torchvision 0.29.1, then pirl with the simulator extras;
#   3. pytest -m sim (the tests marked @pytest.mark.sim).
#
# Exits non-zero if any step or test fails.  Called by .ci/run after the core suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)

# ---- 1. system packages ---------------------------------------------------------------------
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else SUDO="__none__"; fi
fi
if command -v apt-get >/dev/null && [ "$SUDO" != "__none__" ]; then
  . /etc/os-release
  export DEBIAN_FRONTEND=noninteractive
  if [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
    # Debian 12's Mesa 22.3 lavapipe lacks VK_KHR_external_semaphore_fd, which SAPIEN needs.
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
    fi
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q -t bookworm-backports mesa-vulkan-drivers libvulkan1 \
      libegl-mesa0 libgl1-mesa-dri libosmesa6
    $SUDO apt-get install -y -q libegl1 libgl1
  else
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q mesa-vulkan-drivers libvulkan1 libegl1 libgl1 libosmesa6
  fi
else
  echo "sim.sh: apt-get (or root/sudo) unavailable; assuming Vulkan + EGL/OSMesa are installed" >&2
fi
echo "sim.sh: system packages ready after $(( $(date +%s) - start )) s"

# ---- 2. simulator venv ----------------------------------------------------------------------
if [ ! -x .venv-sim/bin/python ]; then
  python3 -m venv .venv-sim
fi
.venv-sim/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv-sim/bin/pip install -q -e '.[dev,maniskill,libero]'
echo "sim.sh: venv ready after $(( $(date +%s) - start )) s"

# ---- 3. smoke tests -------------------------------------------------------------------------
# LIBERO's first-import prompt is avoided by pirl (it writes ~/.libero/config.yaml); stdin is
# closed anyway so that any prompt fails loudly instead of hanging.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv-sim/bin/pytest -m sim -ra -p no:cacheprovider --timeout=900 --durations=15 "$@" < /dev/null
echo "sim.sh: done after $(( $(date +%s) - start )) s"
