#!/usr/bin/env bash
# Debian packages some tests need: chromium (browser tests, DESIGN.md section 7) and
# docker-compose (validates docker-compose.yml; no engine runs here). Installed only when
# missing and only where apt-get can run as root; otherwise those tests skip with a reason.
# Before it installs anything it says which packages, why, and how to skip it
# (CALSEG_NO_SYSTEM_DEPS=1), then waits CALSEG_SYSTEM_DEPS_WAIT_S seconds (default 5) so the
# message can be read and Ctrl-C pressed.
set -u
need=()
why=()
if ! command -v chromium >/dev/null 2>&1; then
  need+=(chromium)
  why+=("  chromium        the page's browser tests (tests/integration/test_frontend.py) and make demo's screenshot")
fi
if ! command -v docker-compose >/dev/null 2>&1; then
  need+=(docker-compose)
  why+=("  docker-compose  checks that docker-compose.yml is valid (tests/test_service_deploy.py; no container is started)")
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ -n "${CALSEG_NO_SYSTEM_DEPS:-}" ]; then
  echo "system-deps: CALSEG_NO_SYSTEM_DEPS is set: not installing ${need[*]}; the tests that need them will skip"
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: cannot install ${need[*]} (needs root and apt-get); the tests that need them will skip"
  exit 0
fi
echo "system-deps: about to install Debian packages as root with apt-get (system-wide, outside .venv):"
printf '%s\n' "${why[@]}"
echo "system-deps: set CALSEG_NO_SYSTEM_DEPS=1 to skip this (those tests then skip); Ctrl-C within ${CALSEG_SYSTEM_DEPS_WAIT_S:-5} s to stop"
sleep "${CALSEG_SYSTEM_DEPS_WAIT_S:-5}"
echo "system-deps: installing ${need[*]} (apt-get update, then apt-get install --no-install-recommends)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
if apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
  echo "system-deps: installed ${need[*]}"
else
  echo "system-deps: apt-get install ${need[*]} failed; the tests that need them will skip"
fi
exit 0
