#!/usr/bin/env bash
# Installs the system packages the project uses beyond pip. For the offline speech corpus
# (python -m clasp_jax.data.synthesize): espeak-ng speaks the sentences, Debian's fortunes
# packages provide them in English, German, Spanish and Italian (Debian has no fortunes-fr).
# libtcmalloc-minimal4: the commands run under tcmalloc when it is there (clasp_jax/common/allocator.py).
# chromium: the search page's browser test (tests/test_search_cli.py, tests/test_search_page.py)
# drives it headless; shellcheck: tests/test_launch.py checks every shell script with it.
#
# As root (and with apt-get) it installs them; otherwise it prints what to install and
# exits 0, so a non-root set-up script can run it unconditionally.
#   scripts/install_system_packages.sh            install, or print what to install
#   scripts/install_system_packages.sh --dry-run  print the commands without running them
set -euo pipefail

PACKAGES=(espeak-ng fortunes fortunes-de fortunes-es fortunes-it libtcmalloc-minimal4 chromium
          shellcheck)
INSTALL=(apt-get install -y --no-install-recommends "${PACKAGES[@]}")

dry_run=0
for argument in "$@"; do
  case "${argument}" in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument ${argument} (see --help)" >&2; exit 2 ;;
  esac
done

missing=()
for package in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "${package}" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("${package}")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "The system packages are installed (${PACKAGES[*]})."
  exit 0
fi

if [[ ${dry_run} -eq 1 ]]; then
  echo "would run: apt-get update"
  echo "would run: ${INSTALL[*]}"
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "Not installing (this needs root and apt-get). Missing: ${missing[*]}"
  echo "Install them with:"
  echo "  sudo apt-get update && sudo ${INSTALL[*]}"
  echo "(other systems: espeak-ng from your package manager, and the Debian fortunes"
  echo " files under /usr/share/games/fortunes, or pass --fortunes_dir to synthesize)"
  exit 0
fi
apt-get update
DEBIAN_FRONTEND=noninteractive "${INSTALL[@]}"
