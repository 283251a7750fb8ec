#!/usr/bin/env bash
# Start the PostgreSQL and Redis servers the integration tests use (DESIGN.md section 7),
# when they are installed here and not already answering. Safe to run repeatedly.
set -u
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    echo "services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
  fi
  pg_isready -h 127.0.0.1 -p 5432 -q && echo "services: PostgreSQL ready on 127.0.0.1:5432"
else
  echo "services: PostgreSQL not installed here; PostgreSQL tests will be skipped"
fi
if command -v redis-server >/dev/null 2>&1; then
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "services: starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
    for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.5; done
  fi
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && echo "services: Redis ready on 127.0.0.1:6379"
else
  echo "services: redis-server not installed here; Redis tests will be skipped"
fi
exit 0
