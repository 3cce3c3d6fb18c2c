#!/usr/bin/env bash
# Installs what building and testing longtake need on a fresh Debian machine. Safe to run again;
# installs only what is missing:
# - protoc (protobuf-compiler) and protobuf's own .proto files (libprotobuf-dev, which
#   --no-install-recommends leaves out): the build scripts of the gRPC crates (ours and
#   etcd-client's, whose protos import google/protobuf/descriptor.proto);
# - etcd (etcd-server): the cluster tests start their own etcd on free loopback ports;
# - ffprobe (ffmpeg): the tests decode the rendered videos;
# - promtool (prometheus): the tests check the daemons' /metrics with Prometheus's own parser;
# - from PyPI, helm-python-sdk (Helm's Go SDK behind a C ABI: `helm template` without a Go
#   toolchain) and kubernetes-validate: the chart test renders deploy/helm and validates it.
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v ffprobe >/dev/null 2>&1 || need+=(ffmpeg)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if ! python3 -c "import helm_python, kubernetes_validate, yaml" >/dev/null 2>&1; then
  python3 -m pip install -q --disable-pip-version-check helm-python-sdk kubernetes-validate pyyaml
fi
