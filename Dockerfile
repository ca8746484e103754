# The gateway in a container: docker build -t gateway . ; compose file in deploy/docker/.
# Runs as an unprivileged user; state (spool, attachments) in the /var/lib/gateway volume;
# configuration mounted at /etc/gateway/gateway.toml (see deploy/docker/gateway.toml).

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/gateway
COPY requirements.lock /src/requirements.lock
# Runtime dependencies only, each checked against the lock's hashes.
RUN /opt/gateway/bin/pip install --require-hashes -r /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
RUN /opt/gateway/bin/pip install --no-deps --no-build-isolation /src

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway --no-create-home \
      --shell /usr/sbin/nologin gateway \
 && install -d -o gateway -g gateway -m 0750 /var/lib/gateway \
 && install -d -m 0755 /etc/gateway
COPY --from=build /opt/gateway /opt/gateway
COPY deploy/docker/gateway.toml /etc/gateway/gateway.toml
ENV PATH=/opt/gateway/bin:$PATH PYTHONUNBUFFERED=1
USER gateway:gateway
WORKDIR /var/lib/gateway
VOLUME ["/var/lib/gateway"]
# 8080 webhooks and APIs, 9108 metrics, 4573 FastAGI, 2525 SMTP (as configured)
EXPOSE 8080 9108 4573 2525
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve", "-c", "/etc/gateway/gateway.toml"]
