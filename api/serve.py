"""Start the api with uvicorn the way the settings say: ``python -m api.serve [--host H]
[--port P] [--workers N]`` (Dockerfile, docker-compose; the embedded service passes
:func:`uvicorn_cli_args` to ``python -m uvicorn``).

Proxy headers: uvicorn believes ``X-Forwarded-For`` from ``127.0.0.1`` unless told otherwise
(its ``--forwarded-allow-ips`` default), so any local client could pick the address the
bad-token limiter counts. Here uvicorn reads proxy headers only when ``settings.trusted_proxies``
lists proxies, and then only from those addresses. ``api.main.client_address`` also puts every
request that carries a forwarding header without configured proxies into one bucket, so even
a plain ``uvicorn api.main:app`` cannot be bypassed by rotating the header.
"""

from __future__ import annotations

import argparse

from calseg.service.settings import Settings, get_settings


def uvicorn_options(settings: Settings) -> dict[str, object]:
    """``uvicorn.run``/``uvicorn.Config`` keyword arguments for proxy headers."""
    trusted = [p for p in settings.trusted_proxies if p]
    if not trusted:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": ",".join(trusted)}


def uvicorn_cli_args(settings: Settings) -> list[str]:
    """The same as :func:`uvicorn_options`, as ``python -m uvicorn`` options."""
    opts = uvicorn_options(settings)
    if not opts["proxy_headers"]:
        return ["--no-proxy-headers"]
    return ["--proxy-headers", "--forwarded-allow-ips", str(opts["forwarded_allow_ips"])]


def main(argv: list[str] | None = None) -> None:
    """``python -m api.serve``: uvicorn serving ``api.main:app``."""
    import uvicorn

    from calseg.service.store import keep_files_private

    keep_files_private()  # uploads and results: the service's user only
    settings = get_settings()
    ap = argparse.ArgumentParser(prog="python -m api.serve", description=__doc__)
    ap.add_argument("--host", default=settings.api_host)
    ap.add_argument("--port", type=int, default=settings.api_port)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    uvicorn.run(
        "api.main:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        **uvicorn_options(settings),  # type: ignore[arg-type]
    )


if __name__ == "__main__":
    main()
