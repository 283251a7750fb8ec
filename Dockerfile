# CalSeg image: api and workers (the command differs per service, see docker-compose.yml).
# torch from PyPI on Linux x86_64 is a CUDA build, so the same image serves GPU workers.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SAM2_BUILD_CUDA=0

RUN apt-get update \
    && apt-get install -y --no-install-recommends git tini \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 calseg
WORKDIR /app

# Dependencies first (layer cache), then the code.
COPY pyproject.toml README.md ./
COPY calseg/__init__.py calseg/__init__.py
RUN pip install --upgrade "pip>=24" \
    && pip install -e . \
    && pip install --no-build-isolation --no-deps \
       "$(sed -n 's/^sam2 = \["\(sam2==[0-9.]*\)"\]/\1/p' pyproject.toml)"

COPY calseg calseg
COPY api api
COPY worker worker
COPY frontend frontend
COPY migrations migrations
COPY alembic.ini ./

RUN mkdir -p /data/artifacts /data/cache /data/logs && chown -R calseg /data
USER calseg

ENV CALSEG_ARTIFACT_DIR=/data/artifacts \
    CALSEG_CACHE_DIR=/data/cache \
    CALSEG_LOG_DIR=/data/logs

EXPOSE 8000
ENTRYPOINT ["tini", "--"]
CMD ["sh", "-c", "alembic upgrade head && python -m api.serve --host 0.0.0.0 --port 8000"]
