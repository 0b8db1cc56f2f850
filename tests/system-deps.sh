#!/usr/bin/env bash
# The system packages the test suite needs besides the venv, run by `make test` before pytest:
#   postgresql         a real PostgreSQL server (tests/plugins/postgres.py initdb's a throwaway one)
#   chromium           the browser the dashboard tests drive through Playwright (tests/plugins/browser.py)
#   fonts-dejavu-core  a font, so chromium's screenshots are readable on a bare image
# Checks first and does nothing when all are present (no apt-get update, well under a second).
# Otherwise installs the missing ones with apt-get, through sudo when not root. Where it cannot
# (no apt-get, no root and no password-less sudo), it names what to install and exits 1.
set -euo pipefail

need=()
# PostgreSQL's server binaries live in a versioned folder (Debian's layout), or on PATH elsewhere.
if ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null && ! command -v pg_ctl >/dev/null; then
  need+=(postgresql)
fi
# The browser tests accept another build through $CHROMIUM (tests/plugins/browser.py).
if [ -n "${CHROMIUM:-}" ]; then
  [ -x "$CHROMIUM" ] || need+=(chromium)
elif ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
  need+=(chromium)
fi
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)

if [ "${#need[@]}" -eq 0 ]; then
  exit 0
fi

cannot() {
  echo "tests/system-deps.sh: the tests need these system packages: ${need[*]}" >&2
  echo "  $1" >&2
  echo "  Install them (Debian/Ubuntu: sudo apt-get install ${need[*]}), then run make test again." >&2
  exit 1
}

command -v apt-get >/dev/null || cannot "No apt-get on this machine, so they cannot be installed from here."
SUDO=()
if [ "$(id -u)" != "0" ]; then
  # -n: fail at once instead of waiting on a password prompt that make may not show.
  sudo -n true 2>/dev/null || cannot "Not root, and sudo is missing or asks for a password."
  SUDO=(sudo -n)
fi

echo "tests/system-deps.sh: installing ${need[*]} (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
