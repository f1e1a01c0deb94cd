# syntax=docker/dockerfile:1
# The kmsgate image: one static-ish binary on distroless, running as uid 65532 with no shell.
#   docker build --build-arg KMSGATE_GIT_COMMIT=$(git rev-parse HEAD) -t ghcr.io/example/kmsgate:0.1.0 .
# The binary is built with `cargo auditable`, so image scanners (Trivy, Grype) list its crates
# from the binary alone; the CycloneDX SBOM of Cargo.lock ships beside it.

FROM rust:1.95-bookworm AS build
# Keep in step with CARGO_AUDITABLE_VERSION in scripts/setup.sh.
ARG CARGO_AUDITABLE_VERSION=0.7.7
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && cargo install --locked "cargo-auditable@${CARGO_AUDITABLE_VERSION}"
WORKDIR /src
COPY . .
# The build context has no .git: pass the commit `kmsgate version` reports, or it says `unknown`.
ARG KMSGATE_GIT_COMMIT=unknown
RUN KMSGATE_GIT_COMMIT="${KMSGATE_GIT_COMMIT}" cargo auditable build --release --locked --bin kmsgate \
 && strip target/release/kmsgate \
 && scripts/sbom.py target/release/kmsgate.cdx.json \
 && scripts/sbom.py --check target/release/kmsgate.cdx.json

# glibc and libgcc only; no shell, no package manager. The `nonroot` variant's user is 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kmsgate /usr/local/bin/kmsgate
COPY --from=build /src/target/release/kmsgate.cdx.json /usr/share/doc/kmsgate/sbom.cdx.json
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kmsgate"]
