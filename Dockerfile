# featurestream as a container: build with cargo, run on a slim Debian.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --bin featurestream

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/featurestream featurestream \
    && mkdir -p /var/lib/featurestream && chown featurestream /var/lib/featurestream
COPY --from=build /src/target/release/featurestream /usr/local/bin/featurestream
COPY pipelines /etc/featurestream/pipelines
USER featurestream
WORKDIR /var/lib/featurestream
EXPOSE 8080
ENTRYPOINT ["featurestream"]
CMD ["run", "/etc/featurestream/pipelines/card_fraud.yaml", "--http", "0.0.0.0:8080"]
