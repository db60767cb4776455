# The one image Palisade runs from on Kubernetes: the control plane, the proxy and the
# `palisade init` container all run `palisade`. `palisade install` and the injector refer to it
# as `palisade:<version>`; push it to your registry and pass `--image` / `--proxy-image`.
#
#   docker build -t palisade:$(cargo pkgid -p palisade | sed 's/.*[#@]//') .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin palisade --bin palisade-proxy

FROM debian:bookworm-slim
# iptables for `palisade init` (the init container runs as root with NET_ADMIN/NET_RAW);
# the proxy and the control plane run as UID 2102, which `palisade init` exempts.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/palisade /src/target/release/palisade-proxy /usr/local/bin/
USER 2102:2102
ENTRYPOINT ["/usr/local/bin/palisade"]
