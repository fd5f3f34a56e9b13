# The worker's image: the sync_worker binary on a slim Debian. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t pg_sync_worker .
# Not exercised on the build machines (no Docker engine); keep it in step with the Makefile's
# `cargo build --release -p sync_worker`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p sync_worker

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/sync_worker /usr/local/bin/sync_worker
# Clients and peers reach the worker on one port; DATABASE_URL and SYNC_JWT_SECRET (or
# SYNC_JWT_PUBLIC_KEY_FILE) come from the environment (docs/worker.md).
ENV SYNC_LISTEN=0.0.0.0:8787 RUST_LOG=sync_worker=info
EXPOSE 8787
USER nobody
ENTRYPOINT ["/usr/local/bin/sync_worker"]
