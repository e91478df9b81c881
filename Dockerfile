# One image for the three processes: `remediator serve` (intake),
# `remediator worker orchestrator` and `remediator worker detection`.
#   docker build -t remediator:0.1.0 .
# The build stage installs the project into a virtual environment; the
# runtime stage copies only that environment, the Rego policies and git
# (GitPython runs the git executable), and runs as an unprivileged user with
# a read-only root filesystem in mind: everything it writes goes to /tmp or
# REMEDIATOR_GIT_WORK_DIR.

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Dependencies first, so a code change reuses the cached layer.
COPY pyproject.toml README.md ./
RUN mkdir -p workflows activities workers remediator \
    && pip install --upgrade pip \
    && pip install .
COPY workflows ./workflows
COPY activities ./activities
COPY workers ./workers
COPY remediator ./remediator
RUN pip install --no-deps --force-reinstall . \
    && python -m compileall -q /opt/venv/lib

FROM python:3.11-slim AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 remediator \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp \
        --shell /usr/sbin/nologin remediator \
    && mkdir -p /var/lib/remediator/git \
    && chown -R 10001:10001 /var/lib/remediator

COPY --from=build /opt/venv /opt/venv
COPY policies /app/policies

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    REMEDIATOR_POLICY_DIRECTORY=/app/policies \
    REMEDIATOR_GIT_WORK_DIR=/var/lib/remediator/git

WORKDIR /app
USER 10001:10001

# 8080: intake HTTP; 8081: worker /healthz and /readyz; 9464: worker metrics.
EXPOSE 8080 8081 9464

ENTRYPOINT ["remediator"]
CMD ["serve"]
