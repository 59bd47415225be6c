# Shared by scripts/quickstart and scripts/test: install what is missing, build the venv.
# Sourced, not run. Idempotent: a second run installs nothing.
set -euo pipefail
VCFS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$VCFS_ROOT/.venv"
APT_PACKAGES=(fuse3 libfuse3-dev softhsm2 ffmpeg pkg-config gcc python3-dev python3-venv rsync systemd)

vcfs_need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then echo sudo; else
      echo "vcfs: error: installing system packages needs root (or sudo)" >&2; exit 1; fi
  fi
}

vcfs_install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    local SUDO; SUDO=$(vcfs_need_root)
    echo "==> installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

vcfs_install_venv() {
  local extra="${1:-}"
  local py="${PYTHON:-python3}"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating Python venv in $VENV"
    "$py" -m venv "$VENV"
  fi
  local stamp="$VENV/.vcfs-installed$extra"
  if [ ! -f "$stamp" ] || [ "$VCFS_ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo "==> installing vcfs$extra into the venv (pyfuse3 builds from source; takes a minute the first time)"
    "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/pip" install -q -e "$VCFS_ROOT$extra" 2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/python" -c "import vcfs, pyfuse3, pkcs11, trio, cryptography" \
      || { echo "vcfs: error: Python dependencies failed to install" >&2; exit 1; }
    touch "$stamp"
  fi
}
