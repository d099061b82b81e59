#!/usr/bin/env bash
# Debian packages homefeed's tests and demo use. Run as root (CI and the dev machines are root);
# otherwise through sudo when it is available.
set -euo pipefail
pkgs=(redis-server)
missing=()
for p in "${pkgs[@]}"; do
  # "install ok installed" only: a removed package leaves its config and still answers dpkg -s
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
# The package starts a system-wide server; homefeed starts its own on free ports.
$SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
