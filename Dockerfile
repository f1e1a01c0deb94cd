# syntax=docker/dockerfile:1
# The kmsgate image: one static-ish binary on distroless, running as uid 65532 with no shell.
#   docker build -t ghcr.io/example/kmsgate:0.1.0 .

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin kmsgate \
 && strip target/release/kmsgate

# glibc and libgcc only; no shell, no package manager. The `nonroot` variant's user is 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kmsgate /usr/local/bin/kmsgate
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kmsgate"]
