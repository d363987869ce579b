#!/usr/bin/env bash
# The system packages the test suite drives for real, installed when missing: the one list of them.
#
#   openssh-server, rsync, netcat-openbsd  `ray up` / `ray submit` over ssh to this machine (tests/sshd_cluster.py)
#   chromium, chromium-driver              the MLflow UI in a headless browser (tests/test_mlflow_ui_browser.py)
#
# Debian package names. Installs with apt-get as root, or through passwordless sudo. Exit status: 0 everything is
# there (or was just installed); 10 something is missing and this user cannot install it (the message says the
# command to run); other non-zero: apt-get itself failed (its output is shown).
#
# Usage: .ci/system-deps.sh [--check]   (--check: only report what is missing, install nothing)
set -uo pipefail

EXIT_CANNOT_INSTALL=10

# program -> package. A program may live in /usr/sbin, which is not on every user's PATH.
declare -A PACKAGE_OF=(
  [sshd]=openssh-server
  [ssh]=openssh-client
  [ssh-keygen]=openssh-client
  [rsync]=rsync
  [nc]=netcat-openbsd
  [chromium]=chromium
  [chromedriver]=chromium-driver
)

have() { PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1; }

missing_packages() {
  local program
  for program in "${!PACKAGE_OF[@]}"; do
    have "$program" || echo "${PACKAGE_OF[$program]}"
  done | sort -u
}

mapfile -t need < <(missing_packages)
if [ ${#need[@]} -eq 0 ]; then
  echo "system-deps: all present (openssh-server rsync netcat-openbsd chromium chromium-driver)"
  exit 0
fi
command_line="apt-get install -y ${need[*]}"
if [ "${1:-}" = "--check" ]; then
  echo "system-deps: missing ${need[*]}; install with: sudo $command_line" >&2
  exit $EXIT_CANNOT_INSTALL
fi

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  as_root=none
fi
if [ "${as_root[*]-}" = none ] || ! command -v apt-get >/dev/null 2>&1; then
  cat >&2 <<EOF
system-deps: the tests need the Debian packages ${need[*]}, which are not installed,
and this user cannot install them (not root, no passwordless sudo, or no apt-get). Ask for them with:

    sudo apt-get update && sudo $command_line

then run the same command again. (Nothing was tested.)
EOF
  exit $EXIT_CANNOT_INSTALL
fi

echo "system-deps: installing ${need[*]} …"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq || exit $?
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || exit $?
mapfile -t still < <(missing_packages)
if [ ${#still[@]} -gt 0 ]; then
  echo "system-deps: apt-get installed ${need[*]} but ${still[*]} still provide no program" >&2
  exit 1
fi
echo "system-deps: installed ${need[*]}"
