# Stand-in for heartexlabs/label-studio:1.23.2 where no image registry is reachable: Label Studio 1.23.2
# from PyPI on the stand-in Python base (scripts/docker_standins.sh builds it). Same port (8080), data
# directory (/label-studio/data) and non-root user id (1001) as the official image, so
# docker/docker-compose.yml runs either unchanged (LABEL_STUDIO_IMAGE picks).
ARG BASE_IMAGE
FROM ${BASE_IMAGE} AS build
# ca.pem: the build host's CA bundle for the package index (build stage only; not in the final image).
COPY ca.pem /tmp/ca.pem
RUN python3 -m venv /opt/label-studio \
    && PIP_CERT=/tmp/ca.pem /opt/label-studio/bin/pip install --no-cache-dir --disable-pip-version-check -q \
        "label-studio==1.23.2"

FROM ${BASE_IMAGE}
COPY --from=build /opt/label-studio /opt/label-studio
RUN useradd --uid 1001 --create-home labelstudio \
    && mkdir -p /label-studio/data && chown -R labelstudio /label-studio
ENV PATH=/opt/label-studio/bin:$PATH \
    LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data \
    SENTRY_DSN= \
    LATEST_VERSION_CHECK=false
USER labelstudio
WORKDIR /label-studio
EXPOSE 8080
CMD ["label-studio", "start", "--no-browser", "--internal-host", "0.0.0.0", "--port", "8080"]
