#!/usr/bin/env bash
# Debian packages some tests need: chromium (browser tests, DESIGN.md section 7) and
# docker-compose (validates docker-compose.yml; no engine runs here). Installed only when
# missing and only where apt-get can run as root; otherwise those tests skip with a reason.
set -u
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: cannot install ${need[*]} (needs root and apt-get); the tests that need them will skip"
  exit 0
fi
echo "system-deps: installing ${need[*]} from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
  || echo "system-deps: apt-get install ${need[*]} failed; the tests that need them will skip"
exit 0
