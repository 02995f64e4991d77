# Stand-in for the official redis image where no image registry is reachable: Debian's redis-server on
# the stand-in Debian base (scripts/docker_standins.sh builds it). redis-server and redis-cli are on PATH
# as in the official image, so docker/docker-compose.yml's command and healthcheck run unchanged.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
